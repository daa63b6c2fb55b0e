"""One small registry class serves every concept (formats, templates, converters, methods, models)."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from chattune.errors import ChattuneError

T = TypeVar("T")


def did_you_mean(name: str, choices: list[str]) -> str:
    """A ' Did you mean X?' hint for a misspelt name, or '' when nothing is close."""
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


class Registry(Generic[T]):
    """Exact-name lookup of registered entries, with a helpful error for unknown names."""

    def __init__(self, concept: str, error: type[ChattuneError] = ChattuneError):
        self.concept, self.error = concept, error
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that registers an entry under `name`."""

        def add(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.concept} '{name}' is registered twice")
            self._entries[name] = entry
            return entry

        return add

    def get(self, name: str) -> T:
        """The entry called `name`; raises a clear error listing the known names otherwise."""
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries))
            raise self.error(
                f"Unknown {self.concept} '{name}'.{did_you_mean(name, list(self._entries))} Known: {known}."
            ) from None

    def names(self) -> list[str]:
        """Registered names, in registration order."""
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)
