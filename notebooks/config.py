"""The settings of every notebook (and of the data/ adapters, benchmarks and tutorial scripts that take settings).

A StackConfig subclass declares a dataclass of defaults, a PRESETS table and a LIMITS table; configure() builds it.
A value is taken from, in rising order: the dataclass default, the preset (chosen for the hardware found), a
STACK_<NAME> environment variable, a --name=value argument (twins only). ConfigError stays in stackcore, whose
own checks (STACK_HOME, the compute dtype, the process group) raise it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator, Sequence, TypeVar

from stackcore import ATTENTION_BACKENDS, ConfigError, GpuInfo, current_gpu

PRESET_NAMES = ("tiny", "colab", "speedrun", "node")
HELP_FLAGS = ("-h", "--help")
BOOLEAN_WORDS = {**dict.fromkeys(("1", "true", "yes", "on"), True), **dict.fromkeys(("0", "false", "no", "off"), False)}
SETTING_TYPES = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}
INT64_MAX = 2**63 - 1  # settings end up in numpy and torch integers
KNOWN_STACK_VARIABLES = frozenset({"STACK_HOME", "STACK_PRESET", "STACK_COLAB_GPU", "STACK_DTYPE", "STACK_DRIVE",
                                   "STACK_TEST_DATA"})  # STACK_ variables that are not notebook settings
ConfigT = TypeVar("ConfigT")
COLAB_GPU_TIERS = ("t4", "l4", "a100", "h100")
FOLDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # a run name: one folder inside STACK_HOME


def in_notebook_kernel() -> bool:
    """True inside a Jupyter/Colab kernel, where sys.argv belongs to the kernel and must be ignored."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and "IPKernelApp" in shell.config


def parse_cli_overrides(argv: Sequence[str]) -> dict[str, str]:
    """`--key=value`, `--key value` and bare `--flag` (meaning true) into raw strings. `-h`/`--help` are left to
    configure, so that the set-up cell, which reads the preset first, does not stop on them."""
    overrides: dict[str, str] = {}
    args = [arg for arg in argv if arg not in HELP_FLAGS]
    while args:
        arg = args.pop(0)
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument {arg!r}: overrides look like --key=value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            value = args.pop(0) if args and not args[0].startswith("--") else "true"
        overrides[key.replace("-", "_")] = value
    return overrides


def parse_value(name: str, raw: Any, kind: Any) -> Any:
    """Convert a raw override to the field's type, with an error that names the field and the expected type."""
    if not isinstance(raw, str):
        return raw
    try:
        if kind is bool:
            return BOOLEAN_WORDS[raw.strip().lower()]
        if kind is int:
            with contextlib.suppress(ValueError):
                return int(raw)  # exact: through a float, ids and seeds beyond 2**53 would change
            number = float(raw.replace("_", ""))  # accepts 524288, 524_288 and 5e5
            if not number.is_integer():
                raise ValueError(raw)
            return int(number)
        return float(raw) if kind is float else raw
    except (KeyError, ValueError):
        raise ConfigError(f"bad value {raw!r} for {name}: expected {getattr(kind, '__name__', kind)}") from None


def layer_list(name: str, text: str) -> tuple[int, ...]:
    """Layer indices from a setting such as "0,2,5,9" ("" for none); a ConfigError names the setting."""
    try:
        return tuple(int(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError:
        raise ConfigError(f"bad value {text!r} for {name}: expected layer numbers separated by commas") from None


def choose_preset(cli: dict[str, str], environ: typing.Mapping[str, str], gpu: GpuInfo | None) -> str:
    """--preset beats STACK_PRESET; with neither, pick from the hardware (auto_preset)."""
    preset = (cli.pop("preset", None) or environ.get("STACK_PRESET")
              or auto_preset(gpu, int(environ.get("WORLD_SIZE", "1"))))
    if preset not in PRESET_NAMES:
        raise ConfigError(f"unknown preset {preset!r}; valid presets: {', '.join(PRESET_NAMES)}")
    return preset


def colab_gpu_tier(gpu: GpuInfo | None, override: str = "") -> str | None:
    """The Colab GPU whose sizes fit `gpu`: t4 before Ampere (T4, V100: no bf16, no FlashAttention), l4 for bf16 GPUs
    under 38 GB (L4, A10G, RTX cards), a100 from 38 GB (A100, L40S), h100 for Hopper and newer from 70 GB (the
    speedrun sizes). `override` (STACK_COLAB_GPU) names one instead; None without a GPU."""
    if override:
        if override not in COLAB_GPU_TIERS:
            raise ConfigError(f"unknown Colab GPU {override!r}; valid: {', '.join(COLAB_GPU_TIERS)}")
        return override
    if gpu is None:
        return None
    if not gpu.has_bf16:
        return "t4"
    if gpu.capability >= (9, 0) and gpu.memory_gb >= 70:
        return "h100"
    return "a100" if gpu.memory_gb >= 38 else "l4"


def auto_preset(gpu: GpuInfo | None, world_size: int = 1) -> str:
    """CPU: tiny; several GPUs: node; an H100-class GPU: speedrun; another GPU: colab (fitted by colab_gpu_tier)."""
    if gpu is None:
        return "tiny"
    if world_size > 1:
        return "node"
    return "speedrun" if colab_gpu_tier(gpu) == "h100" else "colab"



@dataclass(frozen=True)
class Allowed:
    """What a setting may hold (a LIMITS entry, notebooks/config.py): a number from `low` to `high` (`above` leaves
    `low` out), one of `choices`, or a run name (`folder`: one plain folder name, so the run stays inside STACK_HOME;
    `optional`: or empty)."""
    low: float = -math.inf
    high: float = math.inf
    above: bool = False
    choices: tuple[str, ...] = ()
    folder: bool = False
    optional: bool = False

    def describe(self) -> str:
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.folder:
            return ("a folder name of letters, digits, '.', '-' and '_' (nothing that leaves STACK_HOME)"
                    + (", or empty" if self.optional else ""))
        low = f"> {self.low:g}" if self.above else f">= {self.low:g}"
        return low if self.high == math.inf else f"{low} and <= {self.high:g}"

    def admits(self, value: Any) -> bool:
        if self.choices:
            return value in self.choices
        if self.folder:
            return (self.optional and value == "") or (FOLDER_NAME.fullmatch(value) is not None and value != "..")
        return (value > self.low if self.above else value >= self.low) and value <= self.high


def one_of(*choices: str) -> Allowed:
    return Allowed(choices=choices)


def at_least(low: float, high: float = math.inf) -> Allowed:
    return Allowed(low, high)


def above(low: float, high: float = math.inf) -> Allowed:
    return Allowed(low, high, above=True)

def folder_name(optional: bool = False) -> Allowed:
    return Allowed(folder=True, optional=optional)


ATTENTION_SETTING = one_of("auto", *ATTENTION_BACKENDS)  # what a notebook's `attention` setting may be


def setting_requirement(value: Any, kind: Any, allowed: Allowed | None) -> str | None:
    """What a setting must be that `value` is not (the field's type, finite, within int64, `allowed`), or None."""
    if not isinstance(value, SETTING_TYPES.get(kind, object)) or (kind in (int, float) and isinstance(value, bool)):
        return f"of type {kind.__name__}"
    if kind is float and not math.isfinite(value):
        return "a finite number" + (f" {allowed.describe()}" if allowed else "")
    if kind is int and abs(value) > INT64_MAX:
        return f"at most {INT64_MAX}"
    return allowed.describe() if allowed is not None and not allowed.admits(value) else None


@dataclass
class StackConfig:
    """Base of every notebook's config: subclasses add fields, a PRESETS table {preset: {field: value}} (the bases'
    apply first, so a shared base keeps its own) and a LIMITS table {field: Allowed} that validate() checks."""
    preset: str = ""
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}
    LIMITS: ClassVar[dict[str, Allowed]] = {}

    @classmethod
    def limits(cls) -> dict[str, Allowed]:
        """The LIMITS of this class and its bases; a limit for a field the class lacks is a mistake in the table."""
        merged = {name: allowed for klass in reversed(cls.__mro__)
                  for name, allowed in vars(klass).get("LIMITS", {}).items()}
        stray = sorted(set(merged) - {f.name for f in dataclasses.fields(cls)})
        if stray:
            raise ConfigError(f"{cls.__name__}.LIMITS names settings it does not have: {', '.join(stray)}")
        return merged

    def validate(self) -> None:
        """Check every setting against its type and LIMITS (a hook: subclasses add checks across settings)."""
        kinds, limits = typing.get_type_hints(type(self)), self.limits()
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            requirement = setting_requirement(value, kinds[field.name], limits.get(field.name))
            if requirement:
                raise ConfigError(f"{field.name}={value!r}: {field.name} must be {requirement}")


def preset_values(cls: type, preset: str, tier: str | None = None) -> dict[str, Any]:
    """The values a preset sets, the bases' tables first. `colab` fits the GPU's tier (colab_gpu_tier): its own
    table, then `colab_<tier>` where a notebook has one (say `colab_t4`); an H100-class GPU takes the speedrun's."""
    tables = (preset,)
    if preset == "colab" and tier is not None:
        tables = ("speedrun",) if tier == "h100" else ("colab", f"colab_{tier}")
    return {name: value for table in tables for klass in reversed(cls.__mro__)
            for name, value in vars(klass).get("PRESETS", {}).get(table, {}).items()}


def script_argv() -> list[str]:
    """The `--key=value` arguments of a twin run as a script; none in a notebook kernel (its argv is the kernel's)."""
    return [] if in_notebook_kernel() else sys.argv[1:]


@contextlib.contextmanager
def reading_settings() -> Iterator[None]:
    """A ConfigError raised in here is about an option or setting as given: a usage error, which ends a twin run as a
    script with exit status 2, as argparse does (notebooks/runtime.py's end_scripts_on_user_errors)."""
    try:
        yield
    except ConfigError as error:
        error.exit_status = 2
        raise


def misspelt_stack_variables(names: Sequence[str], environ: typing.Mapping[str, str]) -> list[str]:
    """Warnings for STACK_ variables that are not a setting of `names` or a known variable but close to one (difflib);
    the others are left alone: the pipeline sets every notebook's settings for all of them."""
    valid = sorted({f"STACK_{name.upper()}" for name in names} | KNOWN_STACK_VARIABLES)
    unknown = sorted(variable for variable in environ if variable.startswith("STACK_") and variable not in valid)
    if unknown:  # another notebook's setting (STACK_RESUME, read by 03, 05 and 06) is not a misspelling of one here
        unknown = [variable for variable in unknown if variable.removeprefix("STACK_").lower() not in any_settings()]
    matches = {variable: close_match(variable, valid) for variable in unknown}
    return [f"{variable} is not a setting here and is ignored; did you mean {close}?"
            for variable, close in matches.items() if close]


def any_settings() -> set[str]:
    """The field names of the classes in every twin and data/ adapter, read from their source without running them:
    the settings of every notebook (and a few other fields), for the pipeline's STACK_ variables."""
    import ast

    root = Path(__file__).resolve().parents[1]
    sources = [*root.glob("notebooks/[0-9][0-9]_*.py"), *root.glob("data/*.py")]
    return {item.target.id for source in sources for node in ast.walk(ast.parse(source.read_text()))
            if isinstance(node, ast.ClassDef) for item in node.body
            if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)}


def close_match(name: str, valid: Sequence[str]) -> str | None:
    """The valid name closest to a misspelt one (difflib), or None when none is close."""
    import difflib

    return next(iter(difflib.get_close_matches(name, valid, n=1, cutoff=0.8)), None)


def unknown_options_message(unknown: Sequence[str], names: Sequence[str], config_name: str) -> str:
    """The usage error for options a config lacks, with the close name of each misspelt one."""
    guesses = [f"--{close}" for close in (close_match(name, names) for name in unknown) if close]
    guess = f" (did you mean {', '.join(guesses)}?)" if guesses else ""
    return (f"unknown option(s) {', '.join('--' + name for name in unknown)} for {config_name}{guess}; "
            f"valid keys: {', '.join(names)}")


def field_comments(cls: type) -> dict[str, str]:
    """The comment on each field's line in the source of `cls` and its bases (`steps: int = 5  # how long`): what
    --help says about an option. A class without source (defined in an interactive session) has none."""
    import inspect
    import re

    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        field = None
        for line in source.splitlines():
            commented = re.match(r"\s+(\w+)\s*:[^#]*=[^#]*#\s*(.+)$", line)
            continued = re.match(r"\s+#\s*(.+)$", line)
            if commented:
                field, comments[commented[1]] = commented[1], commented[2]
            elif continued and field:  # a comment line right below a field's goes on with it
                comments[field] += " " + continued[1]
            else:
                field = None
    return comments


def usage(cls: type, preset: str, tier: str | None) -> str:
    """--help: every option with its default in the preset that applies, and the comment its field has."""
    defaults = {f.name: f.default_factory() if f.default is dataclasses.MISSING else f.default
                for f in dataclasses.fields(cls) if f.name != "preset"}
    defaults.update(preset_values(cls, preset, tier))
    comments = field_comments(cls)
    width = max(len(name) for name in defaults) + 2
    shown = {name: repr(value) for name, value in defaults.items()}
    value_width = min(max(len(text) for text in shown.values()), 20) + 2
    lines = [f"usage: python {sys.argv[0]} [--preset={'|'.join(PRESET_NAMES)}] [--option=value ...]",
             f"Each option can also be set as STACK_<OPTION>=value. Defaults of the {preset} preset:"]
    return "\n".join(lines + [f"  --{name:<{width}} {text:<{value_width}} {comments.get(name, '')}".rstrip()
                              for name, text in shown.items()])


def configure(cls: type[ConfigT], argv: Sequence[str] | None = None,
              environ: typing.Mapping[str, str] | None = None) -> ConfigT:
    """Build a notebook's config from `argv` (script_argv() by default: --help prints the options and exits, a bad
    option is a usage error). STACK_COLAB_GPU=t4|l4|a100|h100 gives the colab preset that GPU's sizes."""
    if argv is None:
        with reading_settings():
            return configure(cls, script_argv(), environ)
    environ = os.environ if environ is None else environ
    cli = parse_cli_overrides(argv)
    gpu = current_gpu()
    preset = choose_preset(cli, environ, gpu)
    tier = colab_gpu_tier(gpu, environ.get("STACK_COLAB_GPU", ""))
    if any(arg in HELP_FLAGS for arg in argv):
        print(usage(cls, preset, tier))
        raise SystemExit(0)
    kinds = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name != "preset"]
    unknown = sorted(set(cli) - set(names))
    if unknown:
        raise ConfigError(unknown_options_message(unknown, names, cls.__name__))
    for warning in misspelt_stack_variables(names, environ):
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    variables = {name: environ[f"STACK_{name.upper()}"] for name in names if f"STACK_{name.upper()}" in environ}
    values = {**preset_values(cls, preset, tier), **variables, **cli}
    config = cls(preset=preset, **{name: parse_value(name, raw, kinds[name]) for name, raw in values.items()})
    config.validate()
    return config


def describe_config(cfg: Any) -> str:
    """One `key = value` line per field, for the top of a run's log."""
    width = max(len(f.name) for f in dataclasses.fields(cfg))
    return "\n".join(f"{f.name:<{width}} = {getattr(cfg, f.name)!r}" for f in dataclasses.fields(cfg))


def accumulation_steps(tokens_per_step: int, micro_tokens: int, world_size: int) -> int:
    """Forward/backward passes per rank in one optimizer step: the global batch over what all ranks take per pass."""
    per_pass = micro_tokens * world_size
    steps, remainder = divmod(tokens_per_step, per_pass)
    if steps < 1 or remainder:
        nearest = per_pass * max(1, round(tokens_per_step / per_pass))
        raise ConfigError(f"tokens_per_step ({tokens_per_step}) must be a multiple of micro_tokens x ranks "
                          f"({micro_tokens} x {world_size}): pass --tokens_per_step={nearest}, or a smaller "
                          f"--micro_tokens that divides {tokens_per_step // world_size}")
    return steps
