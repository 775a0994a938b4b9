"""What the load generator sends (a seeded workload and its draws) and what it measured (`LoadReport`).

A `Workload` says how many modules there are and of which kinds, how requests pick among them
(uniform or Zipf popularity, plus a base-model-only fraction), and how long prompts and outputs are.
`Workload.sampler(names)` draws requests from it, the same sequence for the same seed.

Lengths as text (the CLI's form): `64` (fixed), `uniform:16:128` (both ends included),
`lognormal:MEAN:SIGMA[:MIN:MAX]` (MEAN: the mean in tokens, SIGMA: the standard deviation of the log;
rounded and clipped to [MIN, MAX], by default [1, 4 * MEAN]).

Output lengths are exact: requests are sent with `ignore_eos=True` and `max_new_tokens` = the drawn
length. Prompt lengths are approximate: a prompt is random words from `FILLER` (common English words,
one token each for most tokenizers), each after a space, added while the tokens they cost fit in the
drawn length less `overhead` (a BOS token). The load generator measures each word's cost and the
overhead on the server first (`loadgen.calibrate`: three Tokenize calls); without that, every word
costs 1. With a byte-level BPE tokenizer prompts then come out exact; otherwise (merges across words,
no word cheap enough to end on) within a token or two. The server's count is reported beside the drawn.
"""

from __future__ import annotations

import itertools
import math
import random
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from benchmarks.common import KINDS, percentile

MIX_KEYS = (*KINDS, "base")
_WORDS = """
a I the of and to in is that it was for on are as with his they at be this from have or by one had not but
what all were when we there can an your which their said if do will each about how up out them then she many
some so these would other into has more her two like him see time could no make than first been its who now
people my made over did down only way find use may water long little very after words called just where most
know get through back much before go good new write our used me man too any day same right look think also
around another came come work three word must because does part even place well such here take why things
help put years different away again off went old number great tell
"""
FILLER = tuple(_WORDS.split())  # common English words: one token each, after a space, for most tokenizers


@dataclass(frozen=True)
class Lengths:
    """A token-length distribution: fixed (low == high), uniform [low, high], or lognormal(mean, sigma)
    rounded and clipped to [low, high]."""

    kind: str = "fixed"
    low: int = 64
    high: int = 64
    mean: float = 0.0
    sigma: float = 0.0

    @classmethod
    def fixed(cls, n: int) -> Lengths:
        return cls("fixed", n, n)

    @classmethod
    def uniform(cls, low: int, high: int) -> Lengths:
        return cls("uniform", low, high)

    @classmethod
    def lognormal(cls, mean: float, sigma: float, low: int = 1, high: int | None = None) -> Lengths:
        return cls("lognormal", low, high if high is not None else max(low, round(4 * mean)), mean, sigma)

    @classmethod
    def parse(cls, text: str | int | Lengths) -> Lengths:
        """`64`, `fixed:64`, `uniform:16:128`, `lognormal:64:0.5` or `lognormal:64:0.5:8:512`."""
        if isinstance(text, Lengths):
            return text
        kind, _, rest = str(text).rpartition(":") if ":" not in str(text) else str(text).partition(":")
        kind, args = kind or "fixed", rest.split(":")
        try:
            if kind == "fixed" and len(args) == 1:
                return cls.fixed(int(args[0]))
            if kind == "uniform" and len(args) == 2:
                return cls.uniform(int(args[0]), int(args[1]))
            if kind == "lognormal" and len(args) in (2, 4):
                bounds = (int(args[2]), int(args[3])) if len(args) == 4 else (1, None)
                return cls.lognormal(float(args[0]), float(args[1]), *bounds)
        except ValueError:
            pass
        raise ValueError(f"length {text!r}: expected N, uniform:A:B or lognormal:MEAN:SIGMA[:MIN:MAX]")

    def __post_init__(self) -> None:
        if self.kind not in ("fixed", "uniform", "lognormal"):
            raise ValueError(f"unknown length distribution {self.kind!r}")
        if not 1 <= self.low <= self.high:
            raise ValueError(f"{self}: lengths must satisfy 1 <= low <= high")
        if self.kind == "lognormal" and (self.mean <= 0 or self.sigma < 0):
            raise ValueError(f"{self}: lognormal needs mean > 0 and sigma >= 0")

    def __str__(self) -> str:
        if self.kind != "lognormal":
            return str(self.low) if self.kind == "fixed" else f"uniform:{self.low}:{self.high}"
        return f"lognormal:{self.mean:g}:{self.sigma:g}:{self.low}:{self.high}"

    def draw(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            return self.low
        if self.kind == "uniform":
            return rng.randint(self.low, self.high)
        mu = math.log(self.mean) - self.sigma**2 / 2  # so that E[exp(N(mu, sigma))] = mean
        return min(self.high, max(self.low, round(rng.lognormvariate(mu, self.sigma))))


def parse_mix(text: str | dict[str, float]) -> dict[str, float]:
    """`prefix=1,prompt=1,lora=1,base=0` (weights, normalised later; keys left out weigh 0)."""
    if isinstance(text, dict):
        mix = dict(text)
    else:
        mix = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = part.partition("=")
            if not sep:
                raise ValueError(f"mix {text!r}: expected KIND=WEIGHT,... with KIND in {', '.join(MIX_KEYS)}")
            mix[key.strip()] = float(value)
    unknown = set(mix) - set(MIX_KEYS)
    if unknown or any(w < 0 for w in mix.values()) or sum(mix.values()) <= 0:
        raise ValueError(f"mix {mix}: keys among {', '.join(MIX_KEYS)}, weights >= 0, not all 0")
    return {k: float(mix.get(k, 0.0)) for k in MIX_KEYS}


@dataclass(frozen=True)
class RequestSpec:
    """One drawn request: `adapter` "" = the base model (module -1)."""

    seq: int
    adapter: str
    kind: str  # prefix / prompt / lora / base
    module: int  # index into the names, -1 for the base model
    prompt: str
    prompt_tokens: int  # drawn (the prompt holds about this many)
    output_tokens: int  # drawn (max_new_tokens, exact with ignore_eos)


_64 = Lengths.fixed(64)


@dataclass
class Workload:
    """Modules and how requests use them. `mix` weighs the three kinds (how the modules are split, and
    with uniform popularity the requests too) and `base`, the fraction of requests on the base model.
    `popularity`: "uniform" or "zipf:S" (module i, from 0, drawn with weight 1 / (i + 1) ** S)."""

    modules: int = 8
    mix: dict[str, float] = field(default_factory=lambda: dict(prefix=1, prompt=1, lora=1, base=0))
    popularity: str = "uniform"
    prompt_len: Lengths = _64  # or its text form, as are the mix and output_len
    output_len: Lengths = _64
    virtual_tokens: int = 16  # of each prefix / soft prompt
    lora_rank: int = 8
    seed: int = 0
    zipf_s: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        self.mix = parse_mix(self.mix)
        self.prompt_len = Lengths.parse(self.prompt_len)
        self.output_len = Lengths.parse(self.output_len)
        kind, _, s = self.popularity.partition(":")
        self.zipf_s = float(s or 1.0) if kind == "zipf" else 0.0
        if ((kind, s) != ("uniform", "") and (kind != "zipf" or self.zipf_s <= 0)) or self.modules < 0:
            raise ValueError(f"popularity {self.popularity!r} ('uniform' or 'zipf:S', S > 0) or modules < 0")

    @property
    def base_fraction(self) -> float:
        """The fraction of requests sent to the base model (all of them without modules)."""
        return 1.0 if not self.modules else self.mix["base"] / sum(self.mix.values())

    def kinds(self) -> list[str]:
        """The kind of each module, interleaved in proportion (module i's kind does not depend on
        `modules`: a workload's first n modules are those of the same workload with n modules)."""
        mix = self.mix
        total = sum(mix[k] for k in KINDS) or 1.0
        counts = dict.fromkeys(KINDS, 0)
        out = []
        for i in range(self.modules):
            kind = max(KINDS, key=lambda k: (mix[k] / total * (i + 1) - counts[k], -KINDS.index(k)))
            counts[kind] += 1
            out.append(kind)
        return out

    def weights(self) -> list[float]:
        """Relative popularity of each module."""
        return [1.0 / (i + 1) ** self.zipf_s for i in range(self.modules)]

    def describe(self) -> dict[str, Any]:
        """The workload as JSON-ready values (lengths in their text form)."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        return {k: str(v) if isinstance(v, Lengths) else v for k, v in values.items()}

    def sampler(self, names: Sequence[str], costs: Sequence[int] | None = None, overhead: int = 0) -> Sampler:
        """Draws for `names` (module i's); `costs[j]`: tokens of " " + FILLER[j] (default 1 each)."""
        return Sampler(self, names, costs or [1] * len(FILLER), overhead)


class Sampler:
    """Draws the workload's requests in a fixed order for its seed; `names[i]` serves module i."""

    def __init__(self, workload: Workload, names: Sequence[str], costs: Sequence[int], overhead: int):
        if len(names) != workload.modules:
            raise ValueError(f"{len(names)} module names for a workload of {workload.modules} modules")
        self.workload, self.names = workload, list(names)
        self.kinds = workload.kinds()
        self.costs, self.overhead = [max(1, c) for c in costs], overhead
        self.cheapest = sorted(range(len(FILLER)), key=self.costs.__getitem__)
        self.rng = random.Random(workload.seed)
        self.words_rng = random.Random(f"words-{workload.seed}")  # the other draws do not depend on it
        self._cum = list(itertools.accumulate(workload.weights()))
        self.drawn = 0

    def prompt(self, tokens: int) -> str:
        """Random filler words costing `tokens` - overhead tokens in all (at least one word)."""
        rng, words, left = self.words_rng, [], tokens - self.overhead
        while left > 0 or not words:
            j = rng.randrange(len(FILLER))
            if self.costs[j] > left:  # near the end: a word that still fits, else stop
                fits = [k for k in self.cheapest if self.costs[k] <= left]
                if not fits and words:
                    break
                j = rng.choice(fits) if fits else self.cheapest[0]
            words.append(FILLER[j])
            left -= self.costs[j]
        return "".join(" " + w for w in words)

    def draw(self) -> RequestSpec:
        w, rng = self.workload, self.rng
        if not self.names or rng.random() < w.base_fraction:
            module, adapter, kind = -1, "", "base"
        else:
            module = rng.choices(range(len(self.names)), cum_weights=self._cum)[0]
            adapter, kind = self.names[module], self.kinds[module]
        prompt_tokens, output_tokens = w.prompt_len.draw(rng), w.output_len.draw(rng)
        self.drawn += 1
        spec = (adapter, kind, module, self.prompt(prompt_tokens), prompt_tokens, output_tokens)
        return RequestSpec(self.drawn - 1, *spec)


METRICS = ("ttft", "tpot", "latency")
QUANTILES = (0.50, 0.90, 0.99)


@dataclass
class RequestRecord:
    spec: RequestSpec
    start: float  # seconds since the load began
    status: str = "OK"
    prompt_tokens: int = 0  # as the server counted them
    tokens: int = 0  # generated
    ttft: float | None = None
    tpot: float | None = None
    latency: float | None = None


@dataclass
class LoadReport:
    mode: str
    workload: dict[str, Any]
    concurrency: int | None = None
    rate: float | None = None
    server: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    records: list[RequestRecord] = field(default_factory=list)
    in_flight: list[tuple[float, int]] = field(default_factory=list)  # open loop: (t, in flight) per arrival
    max_lag: float = 0.0  # open loop: the latest an arrival was sent after its time

    @property
    def ok(self) -> list[RequestRecord]:
        return [r for r in self.records if r.status == "OK"]

    def errors(self) -> Counter[str]:
        return Counter(r.status for r in self.records if r.status != "OK")

    def summary(self) -> dict[str, Any]:
        ok, secs = self.ok, self.seconds
        out: dict[str, Any] = {
            "mode": self.mode,
            "concurrency": self.concurrency,
            "rate": self.rate,
            "modules": self.workload["modules"],
            "seconds": _r(secs),
            "requests": len(self.records),
            "successes": len(ok),
            "errors": len(self.records) - len(ok),
            "errors_by_status": dict(self.errors()),
            "requests_per_s": _r(len(ok) / secs if secs else math.nan),
            "output_tokens": sum(r.tokens for r in ok),
            "output_tokens_drawn": sum(r.spec.output_tokens for r in ok),
            "output_tokens_per_s": _r(sum(r.tokens for r in ok) / secs if secs else math.nan),
            "prompt_tokens_mean": _r(_mean([r.prompt_tokens for r in ok])),
            "prompt_tokens_drawn_mean": _r(_mean([r.spec.prompt_tokens for r in ok])),
            "requests_by_kind": dict(Counter(r.spec.kind for r in self.records)),
        }
        for metric in METRICS:
            xs = [v for r in ok if (v := getattr(r, metric)) is not None]
            out.update({f"{metric}_p{round(q * 100)}_s": _r(percentile(xs, q)) for q in QUANTILES})
        if self.mode == "open":
            counts = [n for _, n in self.in_flight]
            batch = self.server.get("max_batch_size") or math.inf
            over = [t for t, n in self.in_flight if n > batch]
            out |= {
                "in_flight_max": max(counts, default=0),
                "in_flight_mean": _r(_mean(counts)),
                "arrivals_over_batch": len(over),  # arrivals that found the server's batch full
                "over_batch_since_s": _r(over[0]) if over else None,
                "arrival_lag_max_s": _r(self.max_lag),
            }
        return out | {"workload": self.workload, "server": self.server}

    def table(self) -> str:
        """The summary as a few printed lines (times in ms)."""
        s = self.summary()
        load = f"concurrency {self.concurrency}" if self.mode == "closed" else f"rate {self.rate:g}/s"
        lines = [
            f"{self.mode} loop, {load}, {s['modules']} modules, {_f(s['seconds'])} s: "
            f"{s['requests']} requests ({s['successes']} ok, {s['errors']} errors)",
            f"  {_f(s['requests_per_s'], 2)} requests/s, {_f(s['output_tokens_per_s'])} output tokens/s, "
            f"prompt tokens {_f(s['prompt_tokens_mean'])} (drawn {_f(s['prompt_tokens_drawn_mean'])})",
            f"  {'ms':<10}" + "".join(f"{f'p{round(q * 100)}':>10}" for q in QUANTILES),
        ]
        for m in METRICS:
            ps = [s[f"{m}_p{round(q * 100)}_s"] for q in QUANTILES]
            lines.append(f"  {m:<10}" + "".join(f"{_f(v and v * 1000):>10}" for v in ps))
        if self.mode == "open":
            lines.append(
                f"  in flight: max {s['in_flight_max']}, mean {_f(s['in_flight_mean'])}; "
                f"{s['arrivals_over_batch']} arrivals over the batch size"
                + (f" (the first at {_f(s['over_batch_since_s'])} s); " if s["arrivals_over_batch"] else "; ")
                + f"generator lag max {_f(s['arrival_lag_max_s'], 3)} s"
            )
        if s["errors_by_status"]:
            lines.append(
                "  errors: " + ", ".join(f"{k} {v}" for k, v in sorted(s["errors_by_status"].items()))
            )
        return "\n".join(lines)


def _f(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _r(x: float) -> float | None:
    return None if x is None or math.isnan(x) else round(x, 6)


def _mean(xs: list[int] | list[float]) -> float:
    return statistics.fmean(xs) if xs else math.nan
