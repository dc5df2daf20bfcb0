"""Token-length distributions for synthetic prompts and outputs: fixed, uniform, lognormal."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

KINDS = ("fixed", "uniform", "lognormal")


@dataclass(frozen=True)
class LengthDist:
    """A distribution over positive integer token counts.

    fixed: always `mean`. uniform: integers in [low, high]. lognormal: mean `mean` and coefficient
    of variation `cv` (std/mean), the usual shape of real prompt and output lengths: most short,
    a long tail. Samples are clamped to [low, high] (high=None: unbounded).
    """

    kind: str = "fixed"
    mean: float = 128
    cv: float = 0.0
    low: int = 1
    high: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"length distribution {self.kind!r}: choose one of {', '.join(KINDS)}")
        if self.low < 1 or (self.high is not None and self.high < self.low):
            raise ValueError(f"length bounds must satisfy 1 <= low <= high, got [{self.low}, {self.high}]")
        if self.kind != "uniform" and self.mean < 1:
            raise ValueError(f"mean length must be >= 1, got {self.mean}")
        if self.cv < 0:
            raise ValueError(f"cv must be >= 0, got {self.cv}")
        if self.kind == "uniform" and self.high is None:
            raise ValueError("a uniform length distribution needs high")

    @classmethod
    def parse(cls, spec: str | int | LengthDist) -> LengthDist:
        """'128' or 'fixed:128', 'uniform:LOW:HIGH', 'lognormal:MEAN:CV[:MAX]'."""
        if isinstance(spec, LengthDist):
            return spec
        if isinstance(spec, int):
            return cls("fixed", spec)
        kind, _, rest = spec.strip().partition(":")
        if kind.isdigit():
            return cls("fixed", int(kind))
        try:
            args = [float(a) for a in rest.split(":")] if rest else []
        except ValueError:
            raise ValueError(f"length distribution {spec!r}: arguments must be numbers") from None
        if kind == "fixed" and len(args) == 1:
            return cls("fixed", args[0])
        if kind == "uniform" and len(args) == 2:
            return cls("uniform", (args[0] + args[1]) / 2, low=int(args[0]), high=int(args[1]))
        if kind == "lognormal" and len(args) in (2, 3):
            high = int(args[2]) if len(args) == 3 else None
            return cls("lognormal", args[0], args[1], high=high)
        raise ValueError(
            f"length distribution {spec!r}: expected 'fixed:N', 'uniform:LOW:HIGH' "
            "or 'lognormal:MEAN:CV[:MAX]'"
        )

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            value = round(self.mean)
        elif self.kind == "uniform":
            value = rng.randint(self.low, self.high or self.low)
        else:
            sigma2 = math.log1p(self.cv**2)
            # mu chosen so that E[X] = exp(mu + sigma^2/2) is the requested mean
            value = round(rng.lognormvariate(math.log(self.mean) - sigma2 / 2, math.sqrt(sigma2)))
        value = max(self.low, value)
        return value if self.high is None else min(self.high, value)

    def __str__(self) -> str:
        if self.kind == "fixed":
            return f"fixed:{self.mean:g}"
        if self.kind == "uniform":
            return f"uniform:{self.low}:{self.high}"
        return f"lognormal:{self.mean:g}:{self.cv:g}" + (f":{self.high}" if self.high else "")
