"""Write docs/sdk-reference.md, the Python SDK's API reference, from its docstrings and signatures.

python scripts/gen_sdk_reference.py           # rewrite the file
python scripts/gen_sdk_reference.py --check   # fail if the file is stale (run by the tests)
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "docs" / "sdk-reference.md"


def _doc(obj: object) -> str:
    return inspect.cleandoc(obj.__doc__ or "") if getattr(obj, "__doc__", None) else ""


def _signature(name: str, fn: object) -> str:
    """`name(a: T, *, b: U = default) -> R`, with annotations as written in the source."""
    sig = inspect.signature(fn)  # type: ignore[arg-type]
    parts: list[str] = []
    keyword_only = False
    for param in sig.parameters.values():
        if param.name == "self":
            continue
        if param.kind is param.KEYWORD_ONLY and not keyword_only:
            parts.append("*")
            keyword_only = True
        text = param.name
        if param.annotation is not param.empty:
            text += f": {param.annotation}"
        if param.default is not param.empty:
            text += f" = {param.default!r}"
        parts.append(text)
    returns = sig.return_annotation
    tail = f" -> {returns}" if returns is not sig.empty and returns != "None" else ""
    return f"{name}({', '.join(parts)}){tail}"


def _class(name: str, cls: type) -> list[str]:
    out = [f"### `{name}`", ""]
    if dataclasses.is_dataclass(cls):
        fields = ", ".join(f"{f.name}: {f.type}" for f in dataclasses.fields(cls))
        out += [f"`{name}({fields})`", ""]
    if doc := _doc(cls):
        out += [doc, ""]
    if dataclasses.is_dataclass(cls):
        return out
    for attr, member in cls.__dict__.items():
        if attr.startswith("_") and attr not in ("__init__", "__aenter__"):
            continue
        if isinstance(member, property):
            out += [f"- **`{attr}`** (property){' — ' + _doc(member) if _doc(member) else ''}"]
        elif inspect.isfunction(member):
            kind = (
                "async " if inspect.iscoroutinefunction(member) or inspect.isasyncgenfunction(member) else ""
            )
            shown = name if attr == "__init__" else attr
            if attr == "__aenter__":
                continue
            line = f"- **`{kind}{_signature(shown, member)}`**"
            if (doc := _doc(member)) and attr != "__init__":
                line += "\n\n  " + doc.replace("\n", "\n  ")
            out += [line, ""]
    return out


def render() -> str:
    import bimip.sdk as sdk

    out = [
        "# Python SDK reference",
        "",
        "Generated from the docstrings of `bimip.sdk` by `scripts/gen_sdk_reference.py`; a test",
        "fails when it is stale. The guide is [sdk.md](sdk.md).",
        "",
        "## Module",
        "",
        _doc(sdk),
        "",
        "## Classes",
        "",
    ]
    constants = []
    for name in sdk.__all__:
        obj = getattr(sdk, name)
        if inspect.isclass(obj):
            out += _class(name, obj)
        elif isinstance(obj, int):
            constants.append(f"`{name}` = {obj}")
        elif inspect.isfunction(obj):
            out += [f"### `{_signature(name, obj)}`", "", _doc(obj), ""]
        else:  # a union of event types
            out += [f"### `{name}`", "", f"`{obj}`".replace("bimip.sdk.events.", ""), ""]
    out += ["## Constants", "", ", ".join(constants), ""]
    return "\n".join(out).replace("\n\n\n", "\n\n")


def main() -> int:
    text = render()
    if "--check" in sys.argv:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is stale: run python scripts/gen_sdk_reference.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
