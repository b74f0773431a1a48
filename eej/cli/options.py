"""Option groups several commands share: the model, sampling, and the device mesh."""

from __future__ import annotations

import argparse
import dataclasses

import jax

from eej.cli.parser import CliError
from eej.config import SamplingConfig
from eej.experts.moefy import MoefyError, load_moefied
from eej.kernels import cpu_attention, cpu_build, cpu_matmul
from eej.model.attention import get_impl
from eej.parallel.distributed import initialize
from eej.parallel.mesh import make_mesh, parse_mesh_spec
from eej.weights.artifacts import ArtifactError
from eej.weights.registry import load_model


def add_model_arguments(p: argparse.ArgumentParser, attention_list: bool = False) -> None:
    p.add_argument("--model", default="smollm2-135m", help="registry name, .gguf file or HF checkpoint directory")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="parameter dtype")
    p.add_argument(
        "--attention", default="auto",
        help="attention implementation: cpu (a C++ kernel for decode and verification steps: float32 on the CPU "
        "backend, compiled on first use), xla (jnp), auto (default: cpu where it applies — CPU backend, float32, "
        "no mesh — else xla), pallas (Pallas kernels; interpreted on CPU), "
        "triton (jax-triton, GPU only: pip install 'eej[gpu]')"
        + ("; a comma-separated list runs every method once per implementation" if attention_list else ""),
    )
    p.add_argument(
        "--matmul", default="auto", **({} if attention_list else {"choices": ["auto", "xla", "cpu"]}),
        help="how projections and heads multiply: cpu (a C++ kernel for the few rows of a decode or verification "
        "step, compiled on first use; float32 on the CPU backend), xla (jnp.matmul), auto (default: cpu where it "
        "applies — CPU backend, float32, no mesh — else xla)"
        + ("; a comma-separated list runs every method once per implementation" if attention_list else ""),
    )
    p.add_argument("--cache-size", type=int, default=None, help="KV cache positions per row (default: fitted)")
    p.add_argument("--moefy", metavar="ARTIFACT",
                   help="run the dense model as the mixture of experts an `eej train moefy` artifact describes "
                   "(e.g. artifacts/smollm2-135m/moefy.npz)")
    p.add_argument("--experts-per-token", type=int, default=None,
                   help="mixture-of-experts models: experts each token uses (default: the model's or the artifact's)")


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = no limit")
    p.add_argument("--top-p", type=float, default=1.0)
    add_residual_sampling_argument(p)
    p.add_argument("--seed", type=seed_arg, default=0)


def add_residual_sampling_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--residual-sampling", action="store_true",
                   help="(sampling only) draw with one uniform per row and step and verify drafts by speculative "
                        "sampling's residual rule: a few more drafts accepted, and a lossless method's text is plain "
                        "decoding's in distribution only (default: coupled draws, the same text for the same seed)")


def seed_arg(text: str) -> int:
    """argparse type of `--seed`: an integer that fits 64 bits (what the random key is made from)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not -(2**63) <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must fit 64 bits (|seed| < 2**63), got {text}")
    return value


def sampling_from_args(args: argparse.Namespace):
    return SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          coupled=not args.residual_sampling)


def check_lengths(model, max_new_tokens: int, cache_size: int | None) -> int:
    """Refuse `--max-new-tokens` / `--cache-size` the model's context can't hold -> the positions a row can use."""
    context = model.cfg.max_position
    if cache_size is not None and not 1 <= cache_size <= context:
        raise CliError(f"--cache-size must be in [1, {context}] (the context of {model.name}), got {cache_size}")
    capacity = context if cache_size is None else cache_size
    if not 1 <= max_new_tokens < capacity:
        raise CliError(f"--max-new-tokens must be in [1, {capacity - 1}] (a row holds {capacity} positions: "
                       f"{'--cache-size' if cache_size is not None else f'the context of {model.name}'}), "
                       f"got {max_new_tokens}")
    return capacity


def add_parallel_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mesh", help="device mesh, e.g. data=8,model=1 (rows over data, heads/FFN over model); "
                   "default: one device")
    p.add_argument("--coordinator", help="multi-host: HOST:PORT of process 0, or auto to let JAX detect "
                   "SLURM/MPI/TPU-pod settings (or EEJ_COORDINATOR)")
    p.add_argument("--num-processes", type=int, help="multi-host: number of processes (or EEJ_NUM_PROCESSES)")
    p.add_argument("--process-id", type=int, help="multi-host: this process's index (or EEJ_PROCESS_ID)")


def mesh_from_args(args: argparse.Namespace):
    """Join a multi-host job if asked, then build the `--mesh` (None without one). Call before touching devices."""
    distributed = initialize(args.coordinator, args.num_processes, args.process_id)
    if args.mesh is None:
        if distributed:
            raise CliError("multi-host decoding needs --mesh (e.g. --mesh data=N with N = all devices)")
        return None
    return make_mesh(**parse_mesh_spec(args.mesh))


def load_model_from_args(args: argparse.Namespace, attention: str | None = None, mesh=None, matmul: str | None = None):
    """The model of --model/--dtype/--moefy/--experts-per-token, with --attention (or `attention`, if given) and
    --matmul (or `matmul`; resolved for `mesh`, the --mesh the model will run on)."""
    attention = resolve_attention(attention or args.attention, args.dtype, mesh)
    matmul = resolve_matmul(matmul or args.matmul, args.dtype, mesh)
    model = load_model(args.model, dtype=args.dtype, kernels="xla")  # the flags choose them, below
    model = _as_mixture(model, getattr(args, "moefy", None), getattr(args, "experts_per_token", None))
    if attention != model.cfg.attention_impl or matmul != model.cfg.matmul_impl:
        model = dataclasses.replace(model, cfg=model.cfg.replace(attention_impl=attention, matmul_impl=matmul))
    return model


def resolve_matmul(choice: str, dtype: str, mesh=None) -> str:
    """--matmul as `ModelConfig.matmul_impl`: "auto" is "cpu" on the CPU backend for a float32 model off a mesh,
    else "xla"; an explicit "cpu" that cannot run here is a CliError, and so is a kernel that does not compile."""
    if choice not in ("auto", "xla", "cpu"):
        raise CliError(f"--matmul: unknown implementation {choice!r}; one of auto, xla, cpu")
    return _resolve_cpu_kernel("--matmul", choice, dtype, mesh, cpu_matmul.register)


def resolve_attention(choice: str, dtype: str, mesh=None) -> str:
    """--attention as `ModelConfig.attention_impl`: "auto" is "cpu" (eej.kernels.cpu_attention) on the CPU backend
    for a float32 model off a mesh, else "xla"; an unknown name, or an explicit "cpu" that cannot run here, is a
    CliError."""
    if choice != "auto":
        try:
            get_impl(choice)
        except ValueError as e:
            raise CliError(str(e)) from None
    return _resolve_cpu_kernel("--attention", choice, dtype, mesh, cpu_attention.register)


def _resolve_cpu_kernel(flag: str, choice: str, dtype: str, mesh, register) -> str:
    """`choice` of a flag whose "cpu" is one of eej's CPU kernels, resolved by `cpu_build.choose`; "cpu" is built and
    registered (`register`); what cannot run is a one-line CliError."""
    try:
        choice = cpu_build.choose(choice, dtype, mesh, asked=f"{flag} cpu", instead=f"{flag} xla")
        if choice == "cpu":
            register()
    except (ValueError, cpu_build.KernelBuildError) as e:
        raise CliError(str(e).splitlines()[0]) from None
    return choice


def _as_mixture(model, moefy: str | None, experts_per_token: int | None):
    """Apply --moefy / --experts-per-token to a loaded model."""
    if moefy:
        try:
            return load_moefied(model, moefy, experts_per_token)
        except (MoefyError, ArtifactError) as e:
            raise CliError(str(e)) from None
    if experts_per_token is not None:
        if not model.cfg.is_moe:
            raise CliError(f"--experts-per-token needs a mixture-of-experts model; {model.name} is dense (add --moefy ARTIFACT)")
        if not 1 <= experts_per_token <= model.cfg.num_experts:
            raise CliError(f"--experts-per-token must be in [1, {model.cfg.num_experts}], got {experts_per_token}")
        return dataclasses.replace(model, cfg=model.cfg.replace(experts_per_token=experts_per_token))
    return model


def device_description() -> str:
    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', d.platform)} x{jax.device_count()}"
