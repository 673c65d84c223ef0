"""Command-line flags from dataclasses: one --flag per field, its help the field's comment in the source, so
`--help` says what `TrainConfig` says, in the same words (the library modules hold no CLI)."""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import textwrap
import tokenize


def field_help(cls) -> dict[str, str]:
    """Return {field: its documentation}: the comment after the field in the class source, with the comment
    lines that continue it (indented past the field). papermill reads a parameters cell's comments the same way.

    Why not transformers' HfArgumentParser: it takes help from `field(metadata={"help": ...})`, which would turn
    each one-line field of TrainConfig and the studies into three and say it twice (comment and metadata).
    """
    source = textwrap.dedent(inspect.getsource(cls))
    comments = {t.start[0]: (t.start[1], t.string.lstrip("#").strip())
                for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.COMMENT}
    lines = source.splitlines()
    out = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            line = node.end_lineno
            text = [comments[line][1]] if line in comments else []
            while text and line + 1 in comments and not lines[line][:comments[line + 1][0]].strip() \
                    and comments[line + 1][0] > node.col_offset:
                line += 1
                text.append(comments[line][1])
            out[node.target.id] = " ".join(text)
    return out


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls, *, skip=()) -> None:
    """Add one --field-name flag per field of dataclass `cls`, typed from its annotation, its help from its comment."""
    docs = field_help(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type).replace(" | None", "")
        default = None if f.default is dataclasses.MISSING else f.default
        kwargs = {"dest": f.name, "required": f.default is dataclasses.MISSING,
                  "help": f"{docs.get(f.name) or f.name} " + ("(required)" if f.default is dataclasses.MISSING
                                                               else f"(default: {default})")}
        if kind == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, **kwargs)
        elif kind.startswith("tuple[float"):
            parser.add_argument(flag, type=float, nargs=2, default=default, **kwargs)
        elif kind.startswith("tuple[int"):  # module_ranks: --module-ranks Q KV O MLP
            parser.add_argument(flag, type=int, nargs=kind.count("int"), default=default, **kwargs)
        elif kind == "tuple":
            parser.add_argument(flag, nargs="+", default=default, **kwargs)
        else:
            convert_value = {"int": int, "float": float, "str": str}[kind]
            typ = (lambda v, c=convert_value: None if v.lower() == "none" else c(v)) if "None" in str(f.type) \
                else convert_value
            parser.add_argument(flag, type=typ, default=default, **kwargs)


def dataclass_from_args(cls, args: argparse.Namespace, **overrides):
    """Return `cls` built from the parsed flags of `add_dataclass_arguments`, with overrides."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    values.update(overrides)
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
