"""Every option and every loss type of the package, each declared once.

* :data:`LOSS_TYPES` — one entry per loss type: what it reads, how it aggregates its per-token
  terms and which global count it divides by, whether it clips (and its clip defaults), whether it
  has escort weights ω, whether its gradient is token-separable or sequence-scaled. Every module
  asks this table (through ``LossOptions.kind``) instead of comparing loss names.
* :data:`LOSS_OPTIONS` / :data:`BACKEND_OPTIONS` — one :class:`Option` per option: name, default,
  type, the loss types (backends) that read it, its rule, a one-line doc. From them come the typed
  objects the library passes around (:class:`LossOptions`, :class:`BackendOptions`), the
  validation (:mod:`opo_kernels.checks` interprets the rules), the options table of
  ``docs/contract.md`` (:func:`options_table`), the trainer's config keys, TRL's ``OPOConfig``
  fields and verl's option parsing.

Adding a loss type: one :class:`LossType` entry here, the loss type's key in the ``read_by`` of
the options it reads, and its policy-term formula with that formula's closed-form gradient in
:mod:`opo_kernels.losses` (``_POLICY_TERMS``, ``_GRADIENTS``; docs/contract.md, "Adding a loss
type").
"""
from __future__ import annotations

import enum
import typing
from dataclasses import dataclass, field, make_dataclass
from typing import Any, Callable


class Agg(enum.Enum):
    """How a loss type aggregates its per-token terms (and its KL), and what the mean divides by."""
    SEQ_MEAN = "mean over each sequence's tokens, then over sequences (÷ num_seqs_in_batch)"
    SEQ_SUM = "each sequence's token sum, mean over sequences (÷ num_seqs_in_batch)"
    TOKEN_MEAN = "token mean over the batch (÷ num_items_in_batch)"
    MAX_LENGTH = "token sum ÷ (B · max_completion_length), B = num_seqs_in_batch when given"
    GROUP_MEAN = "mean over prompt groups (whole groups in one call: no global counts)"


@dataclass(frozen=True)
class LossType:
    """One loss type. ``loss`` is the value of the ``loss`` option; ``when`` the other option values
    that select this entry among those of the same ``loss`` (OPO's weightings and levels)."""
    key: str
    loss: str
    formula: str                       # the policy-term formula in opo_kernels.losses
    aggregate: Agg
    doc: str
    when: tuple = ()                   # ((option, value), ...)
    clip: tuple[float, float] | None = None  # default (clip_eps_low, clip_eps_high); None: no clip
    escort: bool = False               # weights ω from escort_weights (omega= applies)
    token_separable: bool = False      # a sum of per-token terms (at ratio_level="token")
    sequence_scaled: bool = False      # d loss / d logp_t = F(Δ_s) · c_t within a sequence s
    needs_full_batch: bool = False     # couples sequences through non-constant batch statistics
    rl_terms: bool = True              # reads the RL terms (KL, IS weights, entropy, global counts)
    metric: str | None = None          # the metric of the clip slot: clip_frac / vespo_phi_mean
    # the trainer's defaults of its recipe for this loss type (opo_train)
    adv_scale: str = "group"           # group-relative advantages: "group" (÷ std) or "none"
    dynamic_sampling: bool = False     # drop groups whose rewards are all equal (DAPO)
    overlong_shaping: bool = False     # soft overlong reward penalty (DAPO)

    @property
    def divides_by(self) -> str | None:
        """The global count the policy term's mean divides by: "items", "seqs" or None."""
        return {Agg.TOKEN_MEAN: "items", Agg.GROUP_MEAN: None}.get(self.aggregate, "seqs")

    @property
    def reads(self) -> tuple[str, ...]:
        """The options this loss type may read (some only under a condition: :meth:`Option.read`)."""
        return tuple(o.name for o in LOSS_OPTIONS if self.key in o.read_by)

    def describe(self, o) -> str:
        return ", ".join(f"{k}={getattr(o, k)!r}" for k in ("loss",) + tuple(k for k, _ in self.when))


_CLIP = dict(formula="ppo_clip", clip=(0.2, 0.2), token_separable=True, metric="clip_frac")
#: every loss type, one entry each
LOSS_TYPES: tuple[LossType, ...] = (
    LossType("opo", "opo", "opo", Agg.SEQ_MEAN, when=(("escort", "paper"), ("level", "sequence")),
             escort=True, sequence_scaled=True,
             doc="OPO: −ω·v + (μ/2)·v² per sequence, v from the sequence's (mean) log-ratio Δ"),
    LossType("opo_token", "opo", "opo", Agg.TOKEN_MEAN, when=(("escort", "paper"), ("level", "token")),
             escort=True, token_separable=True, doc="OPO with per-token Δ"),
    LossType("opo_group_softmax", "opo", "group_softmax", Agg.GROUP_MEAN,
             when=(("escort", "group_softmax"),), needs_full_batch=True, rl_terms=False,
             doc="the authors' released weighting (softmax over each prompt group)"),
    LossType("grpo", "grpo", aggregate=Agg.SEQ_MEAN, doc="PPO clip", **_CLIP),
    LossType("dapo", "dapo", aggregate=Agg.TOKEN_MEAN, doc="PPO clip, ε = 0.2 / 0.28",
             dynamic_sampling=True, overlong_shaping=True, **{**_CLIP, "clip": (0.2, 0.28)}),
    LossType("gspo", "gspo", "gspo", Agg.SEQ_MEAN, clip=(3e-4, 4e-4), sequence_scaled=True,
             metric="clip_frac", doc="PPO clip of the sequence ratio exp(mean_t Δ_t)"),
    LossType("dr_grpo", "dr_grpo", aggregate=Agg.MAX_LENGTH, adv_scale="none", doc="PPO clip", **_CLIP),
    LossType("bnpo", "bnpo", aggregate=Agg.TOKEN_MEAN, doc="PPO clip (TRL)", **_CLIP),
    LossType("cispo", "cispo", aggregate=Agg.TOKEN_MEAN, doc="−sg(min(r, ε_high))·A·logp (TRL)",
             **{**_CLIP, "formula": "cispo", "clip": (0.2, 5.0)}),
    LossType("sapo", "sapo", "sapo", Agg.SEQ_MEAN, token_separable=True, metric="clip_frac",
             doc="−sigmoid(τ_A (r − 1))·4/τ_A·A (TRL)"),
    LossType("luspo", "luspo", aggregate=Agg.SEQ_SUM, doc="PPO clip (TRL)", **_CLIP),
    LossType("vespo", "vespo", "vespo", Agg.TOKEN_MEAN, metric="vespo_phi_mean",
             doc="−sg(φ(w))·A·logp, φ a gamma weighting of the sequence ratio w (TRL)"),
)
_BY_KEY = {t.key: t for t in LOSS_TYPES}
#: the values of the ``loss`` option
LOSSES = tuple(dict.fromkeys(t.loss for t in LOSS_TYPES))


def loss_type(o) -> LossType:
    """The entry of :data:`LOSS_TYPES` that options ``o`` select (``o.loss`` must be in LOSSES)."""
    for t in LOSS_TYPES:
        if t.loss == o.loss and all(getattr(o, k) == v for k, v in t.when):
            return t
    raise ValueError(f"no loss type for loss={o.loss!r} with these options")


# ------------------------------------------------------------------------------------------------
# Options
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Rule:
    """What a value must be. ``kind``: "choice" (one of ``choices``), "number" (finite, within
    ``low``/``high``, an end excluded where ``open`` names it: "low", "high"), "count" (an int
    ≥ 1), "flag" (True/False). ``optional``: None is allowed too. ``why``: said in the error."""
    kind: str
    choices: tuple = ()
    low: float | None = None
    high: float | None = None
    open: tuple = ()
    optional: bool = False
    why: str = ""

    def hint(self):
        t = {"choice": str, "number": float, "count": int, "flag": bool}[self.kind]
        return typing.Optional[t] if self.optional else t

    def text(self) -> str:
        """The rule in words (docs, errors)."""
        if self.kind == "choice":
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.kind == "flag":
            return "True or False"
        if self.kind == "count":
            return "a positive int" + (" or None" if self.optional else "")
        lo = None if self.low is None else f"{self.low:g}"
        hi = None if self.high is None else f"{self.high:g}"
        if lo is not None and hi is not None:
            return f"in {'(' if 'low' in self.open else '['}{lo}, {hi}{')' if 'high' in self.open else ']'}"
        if lo is not None:
            return f"{'>' if 'low' in self.open else '>='} {lo}"
        if hi is not None:
            return f"{'<' if 'high' in self.open else '<='} {hi}"
        return "a finite number"


def _choice(*choices, optional=False):
    return Rule("choice", choices=choices + ((None,) if optional else ()), optional=optional)


def _num(low=None, high=None, open=(), optional=False, why=""):
    return Rule("number", low=low, high=high, open=open, optional=optional, why=why)


_POSITIVE = _num(0.0, open=("low",))
_FLAG = Rule("flag")
_COUNT = Rule("count", optional=True)


@dataclass(frozen=True)
class Option:
    """One option. ``read_by``: the loss-type keys (loss options) or backends (backend options)
    that read it; ``when``: a further condition on the other options (with ``when_doc`` in words).
    ``kind``: "layout" (describes the batch: may be passed with every loss), "loss" (the loss's
    own), "rl" (an RL term). ``escort``: an argument of ``escort_weights``. ``trainer``: a key of
    the trainer's config. ``trl``: the ``OPOConfig`` field that sets it."""
    name: str
    default: Any
    rule: Rule
    read_by: frozenset
    doc: str
    kind: str = "loss"
    when: Callable | None = None
    when_doc: str = ""
    escort: bool = False
    trainer: bool = True
    trl: str | None = None

    def read(self, o) -> bool:
        """Whether options ``o`` (their loss type) read this option."""
        return o.kind.key in self.read_by and (self.when is None or self.when(o))


def _keys(*keys) -> frozenset:
    unknown = set(keys) - set(_BY_KEY)
    assert not unknown, unknown
    return frozenset(keys)


_ALL = _keys(*_BY_KEY)
_OPO = _keys("opo", "opo_token", "opo_group_softmax")
_PAPER = _keys("opo", "opo_token")
_GS = _keys("opo_group_softmax")
_RL = frozenset(t.key for t in LOSS_TYPES if t.rl_terms)
_PPO = _keys("grpo", "dapo", "gspo", "dr_grpo", "bnpo", "luspo")  # the two-sided PPO clip
_TOKEN_RATIO = _keys("grpo", "dapo", "dr_grpo", "bnpo", "luspo", "cispo", "sapo")
IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
ESCORTS = ("paper", "group_softmax")

#: every loss option, in the order of the ``LossOptions`` fields
LOSS_OPTIONS: tuple[Option, ...] = (
    Option("loss", "opo", _choice(*LOSSES), _ALL, "the loss type", kind="layout"),
    Option("alpha", 0.4, _num(0.0, 1.0), _OPO, "escort exponent α: ω ∝ exp((1 − α)A/τ)",
           escort=True, trl="opo_alpha"),
    Option("mu", 1.0, _POSITIVE, _OPO, "strength μ of the χ² term", trl="opo_mu"),
    Option("tau", 1.0, _POSITIVE, _OPO, "escort temperature τ", escort=True, trl="opo_tau"),
    Option("level", "sequence", _choice("sequence", "token"), _PAPER,
           "Δ per sequence (the paper) or per token", trl="opo_level"),
    Option("seq_reduce", "mean", _choice("mean", "sum"), _PAPER,
           "a sequence's Δ: mean or sum of its token log-ratios", trl="opo_seq_reduce",
           when=lambda o: o.level == "sequence" or o.ref_correction,
           when_doc="at level='token' only with ref_correction"),
    Option("ratio", "log", _choice("log", "exact"), _PAPER, "v = Δ (log) or e^Δ − 1 (exact)",
           trl="opo_ratio"),
    Option("normalize", "zscore", _choice("zscore", "center"), _PAPER,
           "normalization of the escort weights ω", escort=True, trl="opo_normalize"),
    Option("norm_scope", "batch", _choice("batch", "group"), _PAPER,
           "ω normalized over the batch or each prompt group", escort=True, trl="opo_norm_scope"),
    Option("group_size", None, _COUNT, _ALL, "the G of each prompt group (must divide B)",
           kind="layout", trainer=False),
    Option("ref_correction", False, _FLAG, _PAPER, "the anchor term of Eq. 7 in ω (x −= (1 − α)ℓ)",
           escort=True, trl="opo_ref_correction"),
    Option("max_log_ratio", None, _num(0.0, open=("low",), optional=True), _OPO,
           "clamp Δ to [−c, c]", trl="opo_max_log_ratio"),
    Option("escort", "paper", _choice(*ESCORTS), _OPO,
           "OPO's weighting: the paper's ω or the released group softmax", trl="opo_escort"),
    Option("clip_eps_low", None, _num(0.0, 1.0, open=("high",), optional=True,
                                      why="the ratio's lower bound 1 - eps must stay > 0"),
           _PPO, "lower clip ε (None: the loss type's default)", trl="epsilon"),
    Option("clip_eps_high", None, _num(0.0, optional=True), _PPO | {"cispo"},
           "upper clip ε (cispo: the ratio cap; None: the loss type's default)", trl="epsilon_high"),
    Option("max_completion_length", None, _COUNT, _ALL,
           "the longest completion the sampler may produce (dr_grpo's divisor)", kind="layout",
           trainer=False),
    Option("beta_r", 0.15, _POSITIVE, _GS, "temperature of the advantage softmax"),
    Option("adaptive_tau", True, _FLAG, _GS, "adapt τ to the batch's entropy and reward spread"),
    Option("beta", 0.0, _num(0.0), _RL, "weight of the k3 KL to the reference (ref_logps)",
           kind="rl", trl="beta"),
    Option("use_bias_correction_kl", False, _FLAG, _RL, "the KL times the ratio (TRL's)", kind="rl",
           when=lambda o: o.beta > 0, when_doc="with beta > 0", trl="use_bias_correction_kl"),
    Option("is_correction", None, _choice(*IS_MODES, optional=True), _RL - {"vespo"},
           "rollout-mismatch importance weights from rollout_logps", kind="rl",
           trl="vllm_importance_sampling_mode"),
    Option("is_clip_max", 3.0, _num(0.0, open=("low",), optional=True), _RL - {"vespo"},
           "upper bound of the importance weights", kind="rl", when=lambda o: o.is_correction is not None,
           when_doc="with is_correction", trl="vllm_importance_sampling_clip_max"),
    Option("is_clip_min", None, _num(0.0, open=("low",), optional=True), _RL - {"vespo"},
           "lower bound of the importance weights", kind="rl",
           when=lambda o: o.is_correction is not None, when_doc="with is_correction",
           trl="vllm_importance_sampling_clip_min"),
    Option("entropy_coef", 0.0, _num(0.0, why="the loss subtracts entropy_coef · H"), _RL,
           "weight of the entropy bonus (differentiable)", kind="rl", trl="entropy_coef"),
    Option("top_entropy_quantile", 1.0, _num(0.0, 1.0), _RL,
           "< 1: only the highest-entropy tokens take the policy term", kind="rl",
           trl="top_entropy_quantile"),
    Option("clip_ratio_c", None, _num(1.0, open=("low",), optional=True, why="dual clip"), _PPO,
           "dual clip: a negative advantage's term bounded by −A·c (verl)"),
    Option("sapo_temperature_pos", 1.0, _POSITIVE, _keys("sapo"), "SAPO's τ where A > 0",
           trl="sapo_temperature_pos"),
    Option("sapo_temperature_neg", 1.05, _POSITIVE, _keys("sapo"), "SAPO's τ where A ≤ 0",
           trl="sapo_temperature_neg"),
    Option("ratio_level", "token", _choice("token", "sequence"), _TOKEN_RATIO,
           "the ratio per token or the sequence's length-averaged one",
           trl="importance_sampling_level"),
    Option("clip_delta", None, _num(1.0, open=("low",), optional=True,
                                    why="the two-sided clip's cap on the ratio"), _PPO,
           "two-sided clip: the unclipped ratio capped at δ (TRL's delta)", trl="delta"),
    Option("off_policy_mask_threshold", None, _num(optional=True), _RL,
           "drop a negative-advantage sequence whose mean log(π_rollout/π_θ) exceeds it",
           kind="rl", trl="off_policy_mask_threshold"),
    Option("vespo_k_pos", 2.0, _num(0.0, why="VESPO's exponent k"), _keys("vespo"),
           "VESPO's k where A ≥ 0", trl="vespo_k_pos"),
    Option("vespo_lambda_pos", 3.0, _POSITIVE, _keys("vespo"), "VESPO's λ where A ≥ 0",
           trl="vespo_lambda_pos"),
    Option("vespo_k_neg", 3.0, _num(0.0, why="VESPO's exponent k"), _keys("vespo"),
           "VESPO's k where A < 0", trl="vespo_k_neg"),
    Option("vespo_lambda_neg", 2.0, _POSITIVE, _keys("vespo"), "VESPO's λ where A < 0",
           trl="vespo_lambda_neg"),
)
OPTIONS_BY_NAME = {o.name: o for o in LOSS_OPTIONS}
OPTION_NAMES = tuple(OPTIONS_BY_NAME)
#: the arguments of escort_weights among the options
ESCORT_OPTIONS = tuple(o.name for o in LOSS_OPTIONS if o.escort)


@dataclass(frozen=True)
class ISMode:
    """``is_correction`` parsed: weights per token or per sequence; truncated or masked."""
    per_sequence: bool
    truncate: bool


def is_mode(is_correction: str | None) -> ISMode | None:
    """The typed form of an ``is_correction`` value (one of IS_MODES, or None)."""
    if is_correction is None:
        return None
    level, cut = is_correction.split("_")
    return ISMode(per_sequence=level == "sequence", truncate=cut == "truncate")


def _clip(self) -> tuple[float, float]:
    """(eps_low, eps_high): the options, or the loss type's defaults."""
    lo, hi = self.kind.clip
    return (lo if self.clip_eps_low is None else self.clip_eps_low,
            hi if self.clip_eps_high is None else self.clip_eps_high)


def _typed(name: str, options: tuple, doc: str, namespace: dict):
    return make_dataclass(name, [(o.name, o.rule.hint(), field(default=o.default)) for o in options],
                          frozen=True, namespace={"__doc__": doc, "__module__": __name__, **namespace})


#: the options of one loss call (frozen); ``.kind`` its :class:`LossType`, ``.clip()`` its clip
#: bounds, ``.is_mode`` its parsed ``is_correction``
LossOptions = _typed("LossOptions", LOSS_OPTIONS, "The options of the policy losses (LOSS_OPTIONS).",
                     {"kind": property(loss_type), "clip": _clip,
                      "is_mode": property(lambda self: is_mode(self.is_correction))})
DEFAULTS = LossOptions()


def used_options(o) -> set:
    """The options that options ``o`` read (the others must keep their defaults)."""
    return {opt.name for opt in LOSS_OPTIONS if opt.read(o)}


def counts_read(o) -> tuple[bool, bool]:
    """Whether the loss with options ``o`` reads ``(num_items_in_batch, num_seqs_in_batch)``: the
    denominator of its mean (:attr:`LossType.divides_by`), and the token count of the entropy
    bonus. A loss type without RL terms (escort="group_softmax") reads neither."""
    kind = o.kind
    if not kind.rl_terms:
        return False, False
    return kind.divides_by == "items" or o.entropy_coef > 0, kind.divides_by == "seqs"


# ------------------------------------------------------------------------------------------------
# Backend options
# ------------------------------------------------------------------------------------------------

BACKENDS = ("auto", "triton", "native", "torch", "fused", "reference")
_CHUNKED = frozenset({"triton", "native", "torch"})
_EVERY_BACKEND = frozenset(BACKENDS)

#: every backend option (each one entry: adding one is one line here and its use in the backends)
BACKEND_OPTIONS: tuple[Option, ...] = (
    Option("backend", "auto", _choice(*BACKENDS), _EVERY_BACKEND,
           "the implementation of the LM-head pass (auto: triton on CUDA, native on CPU)"),
    Option("temperature", 1.0, _POSITIVE, _EVERY_BACKEND, "the logits are divided by it"),
    Option("logit_scale", 1.0, _POSITIVE, _EVERY_BACKEND,
           "the logits are multiplied by it before softcap and temperature (Cohere's logit_scale)"),
    Option("softcap", None, _num(0.0, open=("low",), optional=True), _EVERY_BACKEND,
           "soft-capping: s = softcap·tanh(logit_scale·z / softcap) / temperature (Gemma-2)"),
    Option("chunk_size", None, _COUNT, _CHUNKED, "tokens per logits chunk (default from V)"),
    Option("filter_eps", None, _num(0.0, optional=True), frozenset({"fused"}),
           "gradient filtering threshold (None or 0: exact)"),
    Option("deterministic", False, _FLAG, frozenset({"fused"}),
           "state the requirement (the fused backward is reproducible anyway)"),
    Option("accum_fp32", True, _FLAG, frozenset({"fused"}),
           "False: dweight accumulates in its own dtype (no V × H fp32 buffer)"),
)
BACKEND_OPTION_NAMES = tuple(o.name for o in BACKEND_OPTIONS)
#: the options of the LM-head pass of one call (frozen)
BackendOptions = _typed("BackendOptions", BACKEND_OPTIONS,
                        "The options of the LM-head pass (BACKEND_OPTIONS).", {})


def split_options(fn: str, options: dict, *, loss: str | None = None, backend: bool = True):
    """Keyword options of a public function → ``(LossOptions, BackendOptions)`` (built, not yet
    checked). Unknown names raise a TypeError naming them. ``loss`` None: no loss options taken
    (``linear_logprobs``); ``backend`` False: no backend options taken (``policy_loss``)."""
    known = (OPTION_NAMES if loss is not None else ()) + (BACKEND_OPTION_NAMES if backend else ())
    unknown = sorted(set(options) - set(known) | ({"loss"} & set(options)))
    if unknown:
        raise TypeError(f"{fn}() got unexpected keyword argument(s) {unknown}; its options are "
                        f"{[n for n in known if n != 'loss']}")
    lo = None if loss is None else LossOptions(loss=loss, **{k: v for k, v in options.items()
                                                             if k in OPTIONS_BY_NAME})
    bo = BackendOptions(**{k: v for k, v in options.items() if k in BACKEND_OPTION_NAMES})
    return lo, bo


# ------------------------------------------------------------------------------------------------
# The contract's tables
# ------------------------------------------------------------------------------------------------

def _default(o: Option) -> str:
    if o.name in ("clip_eps_low", "clip_eps_high") and o.default is None:
        return "per loss type"
    return f"`{o.default!r}`"


def options_table() -> str:
    """The options table of docs/contract.md (markdown), generated from the declarations."""
    keys = {t.key: t for t in LOSS_TYPES}

    def readers(o: Option, universe) -> str:
        if o.read_by == frozenset(universe):
            who = "every loss type" if universe is keys else "every backend"
        elif universe is keys and o.read_by == _RL:
            who = "every loss type with RL terms"
        elif universe is keys and o.read_by == _RL - {"vespo"}:
            who = "every loss type with RL terms but `vespo`"
        else:
            who = ", ".join(f"`{k}`" for k in universe if k in o.read_by)
        return who + (f" ({o.when_doc})" if o.when_doc else "")

    rows = ["| option | default | rule | read by | what it does |", "|---|---|---|---|---|"]
    rows += [f"| `{o.name}` | {_default(o)} | {o.rule.text()}{' or None' if o.rule.optional and o.rule.kind == 'number' else ''} "
             f"| {readers(o, keys)} | {o.doc} |" for o in LOSS_OPTIONS]
    rows += ["", "| backend option | default | rule | read by | what it does |", "|---|---|---|---|---|"]
    rows += [f"| `{o.name}` | `{o.default!r}` | {o.rule.text()}{' or None' if o.rule.optional and o.rule.kind == 'number' else ''} "
             f"| {readers(o, BACKENDS)} | {o.doc} |" for o in BACKEND_OPTIONS]
    return "\n".join(rows)


def loss_types_table() -> str:
    """The loss-type table of docs/contract.md (markdown), generated from :data:`LOSS_TYPES`."""
    def yes(b):
        return "yes" if b else ""

    rows = ["| loss type | selected by | aggregation | clip (ε_low, ε_high) | ω | token-separable "
            "| sequence-scaled | RL terms |", "|---|---|---|---|---|---|---|---|"]
    for t in LOSS_TYPES:
        sel = ", ".join([f"loss={t.loss!r}"] + [f"{k}={v!r}" for k, v in t.when])
        rows.append(f"| `{t.key}` | `{sel}` | {t.aggregate.value} | {t.clip or ''} | {yes(t.escort)} "
                    f"| {yes(t.token_separable)} | {yes(t.sequence_scaled)} | {yes(t.rl_terms)} |")
    return "\n".join(rows)


_TABLES = {"options": options_table, "loss-types": loss_types_table}


def render_tables(text: str) -> str:
    """``text`` (docs/contract.md) with each generated table between its markers
    (``<!-- generated: NAME -->`` … ``<!-- end generated: NAME -->``) rewritten."""
    for name, make in _TABLES.items():
        start, end = f"<!-- generated: {name} -->", f"<!-- end generated: {name} -->"
        head, sep, rest = text.partition(start)
        _, sep2, tail = rest.partition(end)
        if not (sep and sep2):
            raise ValueError(f"the markers of the {name!r} table are missing")
        text = f"{head}{start}\n{make()}\n{end}{tail}"
    return text


if __name__ == "__main__":  # python -m opo_kernels.options docs/contract.md: rewrite its tables
    import sys
    from pathlib import Path
    for arg in sys.argv[1:]:
        p = Path(arg)
        p.write_text(render_tables(p.read_text()))
