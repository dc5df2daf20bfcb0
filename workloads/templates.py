"""Prompt templates: `str.format` fields checked against the dataset before the first row is rendered."""

from __future__ import annotations

import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class PromptTemplate:
    """A `str.format` template whose fields name either a workload field or a dataset column.

    Checking once against the schema turns a typo in a template into an error at submit time,
    not a KeyError on row 3 million.
    """

    text: str
    fields: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        names: list[str] = []
        try:
            parsed = list(string.Formatter().parse(self.text))
        except ValueError as exc:
            raise ValueError(f"malformed prompt template {self.text!r}: {exc}") from exc
        for _, name, _, _ in parsed:
            if name is None:
                continue
            if name == "" or name.isdigit():
                raise ValueError(
                    f"prompt template {self.text!r} has a positional field; name it, e.g. {{text}}"
                )
            # "{row[a]}" or "{obj.attr}" would reach into values; only plain names are supported
            if not name.isidentifier() and not name.replace(" ", "_").isidentifier():
                raise ValueError(f"prompt template field {{{name}}} is not a plain column name")
            if name not in names:
                names.append(name)
        object.__setattr__(self, "fields", tuple(names))

    def check(self, kind_fields: Iterable[str], columns: Iterable[str], kind: str) -> None:
        """ValueError naming each template field that is neither a workload field nor a column."""
        known = set(kind_fields) | set(columns)
        unknown = [name for name in self.fields if name not in known]
        if unknown:
            raise ValueError(
                f"prompt template field(s) {', '.join('{' + u + '}' for u in unknown)} unknown: "
                f"the {kind} workload provides {', '.join('{' + k + '}' for k in kind_fields)}, "
                f"and the dataset columns are {', '.join(columns)}"
            )

    def render(self, values: Mapping[str, object]) -> str:
        return self.text.format_map(
            {name: "" if values[name] is None else values[name] for name in self.fields}
        )
