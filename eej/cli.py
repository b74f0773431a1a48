"""The `eej` command line: `eej generate`, `eej bench` (eej/bench/cli.py), `eej train METHOD` (eej/train/cli.py).

Bad input ends with a one-line `eej: error: ...` on stderr and exit status 2, never a traceback.
Every command takes `--config FILE`: a YAML mapping of its long option names to values (flags given
on the command line override the file), e.g. for `eej bench --config job.yaml --limit 2`:

    model: smollm2-135m
    questions: ../shared/data/eval/spec_bench.jsonl
    methods: plain
    peers: hf
    max_new_tokens: 256
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable, Sequence

EXIT_USAGE = 2


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors; a command parser with `enable_config()` also reads `--config FILE`."""

    _config_enabled = False

    def error(self, message: str) -> None:  # one line, not argparse's usage block
        raise CliError(message)

    def enable_config(self) -> None:
        """Add `--config FILE`: option values from a YAML file, overridden by flags on the command line."""
        self.add_argument(
            "--config", metavar="FILE",
            help="YAML file of option values (keys: long option names, - or _); flags given here override it",
        )
        self._config_enabled = True

    def parse_known_args(self, args=None, namespace=None):
        if self._config_enabled:
            args = list(sys.argv[1:] if args is None else args)
            path = _config_path(args)
            if path is not None:
                # The file's options go first: argparse keeps the last value given, so flags win.
                args = config_file_arguments(self, path) + args
        return super().parse_known_args(args, namespace)


def _config_path(args: Sequence[str]) -> str | None:
    """The FILE of `--config FILE` / `--config=FILE` among a command's arguments (before any `--`)."""
    found: list[str] = []
    for i, a in enumerate(args):
        if a == "--":
            break
        if a == "--config":
            if i + 1 >= len(args):
                raise CliError("argument --config: expected one argument")
            found.append(args[i + 1])
        elif a.startswith("--config="):
            found.append(a.partition("=")[2])
    if len(found) > 1:
        raise CliError("give --config once")
    return found[0] if found else None


def config_file_arguments(parser: argparse.ArgumentParser, path: str) -> list[str]:
    """The command-line arguments equivalent to the option values in the YAML file `path`.

    Keys are `parser`'s long option names without the dashes (`max-new-tokens` or `max_new_tokens`);
    values are scalars, lists for options taking several values, booleans for flags. Unknown keys,
    values of the wrong type and method presets files are one-line errors naming the file and the key.
    """
    import difflib

    import yaml

    if not os.path.isfile(path):
        raise CliError(f"config file not found: {path}")
    with open(path) as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise CliError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    if data is None:
        return []
    if not isinstance(data, dict):
        raise CliError(f"{path}: expected a mapping of option names to values")
    if "presets" in data:
        raise CliError(f"{path} holds method presets, not command options; use it as --method NAME:{path}")
    options: dict[str, argparse.Action] = {}
    for action in parser._actions:
        for flag in action.option_strings:
            if flag.startswith("--") and flag not in ("--help", "--config"):
                options[flag[2:]] = action
    out: list[str] = []
    for key, value in data.items():
        name = str(key).replace("_", "-")
        if name not in options:
            close = difflib.get_close_matches(name, list(options), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise CliError(f"{path}: unknown option {key!r} for `{parser.prog}`{hint}")
        out += _option_arguments(options[name], name, value, f"{path}: {key}")
    return out


def _option_arguments(action: argparse.Action, name: str, value: Any, where: str) -> list[str]:
    """`--name value...` for one config entry, checked against the option's type and choices."""
    flag = f"--{name}"
    if value is None:
        return []
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise CliError(f"{where}: expected true or false, got {value!r}")
        return [flag] if value == isinstance(action, argparse._StoreTrueAction) else []
    if action.nargs == 0:
        raise CliError(f"{where}: this option takes no value")
    many = action.nargs in ("+", "*") or isinstance(action.nargs, int)
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not many and len(values) != 1:
        raise CliError(f"{where}: expected one value, got a list")
    if many and action.nargs == "+" and not values:
        raise CliError(f"{where}: expected at least one value")
    texts = []
    for v in values:
        if isinstance(v, (dict, list)):
            raise CliError(f"{where}: expected a plain value, got {v!r}")
        text = str(v).lower() if isinstance(v, bool) else str(v)
        if action.type is not None:
            try:
                action.type(text)
            except (TypeError, ValueError, argparse.ArgumentTypeError):
                raise CliError(f"{where}: invalid value {v!r} ({getattr(action.type, '__name__', 'value')} expected)") from None
        if action.choices is not None and text not in [str(c) for c in action.choices]:
            raise CliError(f"{where}: invalid choice {v!r} (choose from {', '.join(map(str, action.choices))})")
        texts.append(text)
    # `--name=value` keeps values that start with '-' from being read as options.
    return [flag, *texts] if many else [f"{flag}={texts[0]}"]


_SUBCOMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def subcommand(name: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
    """Register `eej NAME`: `add_arguments(parser)` declares its options; the decorated fn runs it."""

    def register(run: Callable[[argparse.Namespace], int]):
        _SUBCOMMANDS[name] = (add_arguments, run)
        return run

    return register


# ----------------------------------------------------------------------------- shared options


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="registry name, .gguf file or HF checkpoint directory")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="parameter dtype")
    p.add_argument(
        "--attention", default="xla",
        help="attention implementation: xla (default), pallas (Pallas kernels; interpreted on CPU), "
        "triton (jax-triton, GPU only: pip install 'eej[gpu]')",
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
    p.add_argument("--seed", type=int, default=0)


def sampling_from_args(args: argparse.Namespace):
    from eej.config import SamplingConfig

    return SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)


def add_parallel_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mesh", help="device mesh, e.g. data=8,model=1 (rows over data, heads/FFN over model); "
                   "default: one device")
    p.add_argument("--coordinator", help="multi-host: HOST:PORT of process 0, or auto to let JAX detect "
                   "SLURM/MPI/TPU-pod settings (or EEJ_COORDINATOR)")
    p.add_argument("--num-processes", type=int, help="multi-host: number of processes (or EEJ_NUM_PROCESSES)")
    p.add_argument("--process-id", type=int, help="multi-host: this process's index (or EEJ_PROCESS_ID)")


def mesh_from_args(args: argparse.Namespace):
    """Join a multi-host job if asked, then build the `--mesh` (None without one). Call before touching devices."""
    from eej.parallel.distributed import initialize
    from eej.parallel.mesh import make_mesh, parse_mesh_spec

    distributed = initialize(args.coordinator, args.num_processes, args.process_id)
    if args.mesh is None:
        if distributed:
            raise CliError("multi-host decoding needs --mesh (e.g. --mesh data=N with N = all devices)")
        return None
    return make_mesh(**parse_mesh_spec(args.mesh))


def load_model_from_args(args: argparse.Namespace):
    from eej.model.attention import get_impl
    from eej.weights.registry import load_model

    try:
        get_impl(args.attention)
    except ValueError as e:
        raise CliError(str(e)) from None
    model = load_model(args.model, dtype=args.dtype)
    model = _as_mixture(model, getattr(args, "moefy", None), getattr(args, "experts_per_token", None))
    if args.attention != model.cfg.attention_impl:
        import dataclasses

        model = dataclasses.replace(model, cfg=model.cfg.replace(attention_impl=args.attention))
    return model


def _as_mixture(model, moefy: str | None, experts_per_token: int | None):
    """Apply --moefy / --experts-per-token to a loaded model."""
    import dataclasses

    from eej.experts.moefy import MoefyError, load_moefied
    from eej.train.artifacts import ArtifactError

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
    import jax

    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', d.platform)} x{jax.device_count()}"


# ----------------------------------------------------------------------------- eej generate


def _generate_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    add_parallel_arguments(p)
    p.add_argument("--method", default="plain", help="decoding method, NAME[:CONFIG]")
    p.add_argument("--prompt", help="the prompt text")
    p.add_argument("--batch-file", help="JSONL file with one {\"prompt\": ...} object per line")
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (with --batch-file)")
    p.add_argument("--chat", action="store_true", help="wrap prompts in the model's chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--no-stream", action="store_true", help="don't stream tokens to the terminal")
    add_sampling_arguments(p)


def read_prompt_file(path: str) -> list[str]:
    """Prompts from a JSONL file of {"prompt": str} objects."""
    from eej.jsonl import read_jsonl

    prompts = []
    for n, obj in read_jsonl(path, "batch file", CliError):
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            raise CliError(f'{path}:{n}: expected an object with a string "prompt" field')
        prompts.append(obj["prompt"])
    if not prompts:
        raise CliError(f"{path} holds no prompts")
    return prompts


@subcommand("generate", _generate_arguments)
def cmd_generate(args: argparse.Namespace) -> int:
    if (args.prompt is None) == (args.batch_file is None):
        raise CliError("give exactly one of --prompt TEXT or --batch-file FILE.jsonl")
    if args.batch_size < 1:
        raise CliError(f"--batch-size must be >= 1, got {args.batch_size}")
    sampling = sampling_from_args(args)
    texts = [args.prompt] if args.prompt is not None else read_prompt_file(args.batch_file)

    from eej.decoding.engine import Engine
    from eej.decoding.methods import build_method

    mesh = mesh_from_args(args)
    model = load_model_from_args(args)
    strategy, method_params = build_method(model, args.method)
    engine = Engine(model, strategy, method_params, cache_size=args.cache_size, mesh=mesh)
    tok = model.tokenizer
    prompts = [tok.encode_chat(t) if args.chat else tok.encode(t) for t in texts]

    import jax

    lead = jax.process_index() == 0  # every process computes; the first one reports
    stream = lead and not args.json and not args.no_stream and len(prompts) == 1 and sys.stdout.isatty()
    # Batch prompts of similar length together (less padding); results go back in input order.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[dict[str, Any]] = [{} for _ in prompts]
    seconds = compile_seconds = decode_seconds = 0.0
    decode_tokens = 0
    for start in range(0, len(order), args.batch_size):
        rows = order[start : start + args.batch_size]
        chunk = [prompts[i] for i in rows]
        if stream:
            out = _stream_to_terminal(engine, chunk[0], args, sampling)
        else:
            out = engine.generate(chunk, args.max_new_tokens, sampling, seed=args.seed)
        seconds += out.seconds
        compile_seconds += out.compile_seconds
        decode_seconds += out.decode_seconds
        decode_tokens += sum(out.new_tokens) - len(chunk)  # the first token of each row comes from the prefill
        for i, ids in zip(rows, out.tokens):
            results[i] = {"prompt": texts[i], "text": tok.decode(ids), "token_ids": ids, "new_tokens": len(ids)}
    total = sum(r["new_tokens"] for r in results)
    tps = total / seconds if seconds > 0 else 0.0
    if not lead:
        return 0
    if args.json:
        print(
            json.dumps(
                {
                    "model": model.name,
                    "method": args.method,
                    "outputs": results,
                    "seconds": seconds,
                    "tokens_per_second": tps,
                    "device": device_description(),
                    "attention": model.cfg.attention_impl,
                    "mesh": None if mesh is None else dict(mesh.shape),
                    "processes": jax.process_count(),
                }
            )
        )
        return 0
    if not stream:
        for r in results:
            if len(results) > 1:
                print(f"### {r['prompt']}")
            print(r["text"])
    decode_rate = decode_tokens / decode_seconds if decode_seconds > 0 else 0.0
    print(
        f"[{total} tokens in {seconds:.2f} s: {tps:.1f} tokens/s overall, {decode_rate:.1f} tokens/s decoding "
        f"(prefill {seconds - decode_seconds:.2f} s); method {args.method}; compile {compile_seconds:.1f} s not counted; "
        f"{device_description()}]",
        file=sys.stderr,
    )
    return 0


def _stream_to_terminal(engine, prompt: list[int], args: argparse.Namespace, sampling):
    """Print text as it is generated (incremental detokenization); returns the GenerationOutput."""
    tok = engine.model.tokenizer
    stream = engine.stream([prompt], args.max_new_tokens, sampling, seed=args.seed)
    ids: list[int] = []
    printed = ""
    for new in stream:
        ids.extend(new[0])
        text = tok.decode(ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the rest
            continue
        sys.stdout.write(text[len(printed) :])
        sys.stdout.flush()
        printed = text
    sys.stdout.write("\n")
    return stream.output


# ----------------------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    _load_subcommands()
    parser = _Parser(prog="eej", description="Early-exit and self-speculative LLM decoding in JAX.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (add_arguments, _) in _SUBCOMMANDS.items():
        command = sub.add_parser(name)
        add_arguments(command)
        _enable_config_on_commands(command)
    return parser


def _enable_config_on_commands(parser: argparse.ArgumentParser) -> None:
    """`--config FILE` on every command that runs something (`eej train METHOD`, not `eej train`)."""
    nested = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not nested:
        parser.enable_config()
    for action in nested:
        for child in dict.fromkeys(action.choices.values()):
            _enable_config_on_commands(child)


def _load_subcommands() -> None:
    """Import the modules that register further subcommands (bench, train, ...)."""
    import importlib

    for module in ("eej.bench.cli", "eej.train.cli"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)  # as typed, for reproduce lines
        if args.command is None:
            parser.print_help()
            return EXIT_USAGE
        return _SUBCOMMANDS[args.command][1](args)
    except CliError as e:
        print(f"eej: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, FileNotFoundError, OSError) as e:
        if os.environ.get("EEJ_DEBUG"):
            raise
        print(f"eej: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("eej: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # `python -m eej.cli`: subcommands register with the imported eej.cli, not __main__
    from eej.cli import main as _main

    sys.exit(_main())
