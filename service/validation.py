"""Pydantic validation errors as messages an operator can act on: where each problem is,
what was wrong, and for a misspelt key the keys that exist (no pydantic links or dumps)."""

from __future__ import annotations

import difflib
import types
from collections.abc import Callable
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError


def suggest(name: str, known: list[str] | set[str] | tuple[str, ...] | Any,
            limit: int = 20) -> str:
    """A hint for an unknown name: the close matches, else what exists."""
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=5)
    if close:
        return f"did you mean {', '.join(close)}?"
    shown = ", ".join(known[:limit]) + (", …" if len(known) > limit else "")
    return f"known: {shown}"


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation may hold (through Optional, unions, Literal)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if get_origin(annotation) is Annotated:  # a tagged or discriminated union
        return _models_in(get_args(annotation)[0])
    if get_origin(annotation) in (Union, types.UnionType):
        return [m for arg in get_args(annotation) for m in _models_in(arg)]
    return []


def _keys_at(root: type[BaseModel], loc: tuple[int | str, ...]) -> list[str] | None:
    """The keys the model at `loc` (the unknown key's parent) accepts, if it can be told."""
    model: type[BaseModel] | None = root
    rest = list(loc)
    while rest and model is not None:
        part = rest.pop(0)
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        annotation = field.annotation
        if get_origin(annotation) in (dict, list) and rest:
            rest.pop(0)  # a dict key or list index
            annotation = get_args(annotation)[-1]
        found = _models_in(annotation)
        if len(found) == 1:
            model = found[0]
        elif rest and isinstance(rest[0], str):
            model = next((m for m in found if m.__name__ == rest[0]), None)
            rest = rest[1:] if model is not None else rest
        else:
            model = None
    return sorted(model.model_fields) if model is not None else None


def describe(exc: ValidationError, root: type[BaseModel],
             where: Callable[[tuple[int | str, ...]], str]) -> str:
    """One clause per problem, `where(loc)` naming its place (a key path, a flag)."""
    problems = []
    for error in _one_branch_per_union(exc.errors()):
        loc = tuple(error["loc"])
        if error["type"] == "extra_forbidden" and loc:
            keys = _keys_at(root, tuple(error.get("tagged_loc", loc))[:-1])
            hint = ""
            if keys:
                close = difflib.get_close_matches(str(loc[-1]), keys, n=3)
                maybe = f"did you mean {', '.join(f'`{k}`' for k in close)}? " if close else ""
                hint = f"; {maybe}keys: {', '.join(keys)}"
            place = f" in {where(loc[:-1])}" if loc[:-1] else ""
            problems.append(f"unknown key `{loc[-1]}`{place}{hint}")
            continue
        message = error["msg"].removeprefix("Value error, ")
        problems.append(f"{where(loc)}: {message}" if loc else message)
    return "; ".join(problems)


def _tag(part: int | str) -> bool:
    """Whether a loc part is a union branch's tag (`LatestPolicy`, `literal['all']`)."""
    return isinstance(part, str) and (part[:1].isupper() or part.startswith("literal["))


def _one_branch_per_union(errors: list[Any]) -> list[Any]:
    """A value that fits no branch of a union fails every branch; report only the branch
    it came closest to (fewest missing keys, then fewest problems), without the tag."""
    branches: dict[tuple[int | str, ...], dict[int | str, list[Any]]] = {}
    kept: list[Any] = []
    for error in errors:
        loc = tuple(error["loc"])
        at = next((i for i, part in enumerate(loc) if _tag(part)), None)
        if at is None:
            kept.append(error)
        else:
            tagless = {**error, "loc": loc[:at] + loc[at + 1:], "tagged_loc": loc}
            branches.setdefault(loc[:at], {}).setdefault(loc[at], []).append(tagless)
    for options in branches.values():
        # On a tie a model branch says more than "should be 'all'".
        kept.extend(min(options.items(), key=lambda item: (
            sum(e["type"] == "missing" for e in item[1]), len(item[1]),
            str(item[0]).startswith("literal[")))[1])
    return kept
