"""The run configuration: one flat dataclass, YAML files, and ``key=value`` overrides.

Every key is a field of :class:`Config` with a type; YAML values and command-line overrides are
checked against it, and a bad key or value raises ``ValueError`` naming the key and what was seen.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

# The loss options (names, types, defaults, rules, docs) are declared once, in opo_kernels.options:
# the trainer's keys of the same names are made from those declarations (see _with_loss_options),
# passed through, and checked there, naming the key.
from opo_kernels.checks import check_options
from opo_kernels.options import BACKENDS, LOSS_OPTIONS, LossOptions

CONFIG_DIR = Path(__file__).parent / "configs"
ASSETS_DIR = Path(__file__).parent / "assets"
TINY_MODEL = "tiny"  # the Qwen3 config shipped in assets/tiny_qwen3 (random init)



def _with_loss_options(cls):
    """Add a key for every loss option the trainer exposes (:data:`opo_kernels.options.LOSS_OPTIONS`
    with ``trainer=True``: not ``group_size`` and ``max_completion_length``, which are the trainer's
    own ``group_size`` and ``max_new_tokens``), with the option's type, default and doc, in the
    loss section (before ``loss_impl``)."""
    keys = {}
    for name, hint in cls.__annotations__.items():
        if name == "loss_impl":
            for o in LOSS_OPTIONS:
                if o.trainer:
                    keys[o.name] = o.rule.hint()
                    setattr(cls, o.name, o.default)
        keys[name] = hint
    cls.__annotations__ = keys
    return cls


@dataclass
@_with_loss_options
class Config:
    # -- run ------------------------------------------------------------------------------------
    output_dir: str = "runs/toy"  # where the run writes everything (one run per folder)
    seed: int = 0  # model init, sampling and toy problems
    max_steps: int = 0             # outer iterations (rollout batches); 0 = from `epochs`
    epochs: float = 0.0            # passes over a finite train set (used when max_steps == 0)
    resume: bool = False           # continue from the latest complete checkpoint in output_dir
    overwrite: bool = False        # start over in an output_dir that holds a run (deletes its outputs)
    device: str = "auto"           # auto | cpu | cuda
    cpu_threads: int = 0           # torch threads per process on CPU; 0 = torch's default

    # -- model ----------------------------------------------------------------------------------
    model: str = TINY_MODEL        # "tiny" (shipped config, random init) or a local HF directory
    tokenizer: str = ""            # "" = the model directory (or the shipped tokenizer for "tiny")
    dtype: str = "auto"            # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16
    model_overrides: dict = field(default_factory=dict)  # HF config fields, e.g. {vocab_size: 32768}
    activation_checkpointing: bool = False  # recompute each decoder block in backward (less memory)
    attn_implementation: str = "auto"  # auto | sdpa | eager | flash_attention_2
    packed: str = "auto"           # auto (padding-free when flash-attn is usable) | true | false
    fsdp: bool = True              # False: plain module, only allowed with one process
    lora_r: int = 0                # > 0: train LoRA adapters (peft) of this rank; the base is frozen
    lora_alpha: float = 16.0  # LoRA scale numerator (scale = lora_alpha / lora_r)
    lora_dropout: float = 0.0      # keep 0: dropout makes the anchor differ from the policy (Δ ≠ 0)
    lora_target_modules: list = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])  # LoRA: module names

    # -- task and data --------------------------------------------------------------------------
    task: str = "toy"              # toy (built-in) | math (MATH-format files) | hf (datasets.load_dataset)
    toy_task: str = "add"          # add ("37+45=" -> "82") | reverse ("3817>" -> "7183")
    toy_digits: int = 2            # add: operands of up to this many digits; reverse: 2..digits+2
    train_file: str = ""           # math: jsonl / parquet with problem, solution, level; hf: any
    #                                jsonl / json / csv / parquet file or saved dataset with a prompt column
    train_levels: list = field(default_factory=list)   # e.g. ["Level 3"]; [] = all
    train_fraction: float = 1.0    # keep this fraction of the train rows (sampled with data_seed)
    data_seed: int = 42  # shuffling and train_fraction sampling of a dataset
    val_file: str = ""  # validation rows (same format as train_file); "" = none (toy: its own split)
    val_levels: list = field(default_factory=list)  # like train_levels, for val_file
    val_size: int = 0              # 0 = all validation rows
    val_every: int = 0             # steps between validations; 0 = never
    prompt_suffix: str = "\nPlease reason step by step, and put your final answer within \\boxed{}."  # appended to each MATH problem (task math)
    chat_template: str = "auto"    # auto (the tokenizer's, if any) | true | false | a Jinja template
    chat_template_kwargs: dict = field(default_factory=dict)  # e.g. {enable_thinking: false}
    max_prompt_length: int = 512  # longest prompt in tokens; longer ones: see truncate
    truncate: str = "error"        # a longer prompt: error (stop, naming it) | left | right (cut
    #                                that side, with a warning and the prompts_truncated metric)

    # -- rollout --------------------------------------------------------------------------------
    engine: str = "hf"             # hf | vllm
    prompts_per_step: int = 16     # global, over all ranks
    group_size: int = 8            # G generations per prompt
    max_new_tokens: int = 6  # longest completion in tokens (TRL: max_completion_length)
    temperature: float = 1.0  # sampling temperature (also applied to the trainer's log-probs)
    top_p: float = 1.0  # nucleus sampling
    vllm_gpu_memory_utilization: float = 0.4  # vLLM: share of GPU memory for its weights and KV cache
    vllm_sleep: bool = True        # free the KV cache between rollout and training
    tensor_parallel_size: int = 1  # ranks that split the loss head's vocabulary (and engine=vllm:
    #                                make one engine); torchrun, must divide the number of processes

    # -- rewards --------------------------------------------------------------------------------
    rewards: list = field(default_factory=lambda: ["auto"])  # auto (the task's: toy, math) | toy |
    #                     math | module:function of your own (several: [mod:f, mod:g]; TRL: reward_funcs)
    reward_weights: list = field(default_factory=list)       # one per reward function; [] = all 1.0
    reward_timeout: float = 30.0   # seconds for one reward call over the whole batch
    reward_isolation: str = "process"  # process (a forked worker: a hang costs nothing) | thread
    reward_max_failed_steps: int = 3   # stop after this many steps in a row without any reward; 0 = never
    zero_signal_steps: int = 10    # warn when reward and gradient stay zero this many steps; 0 = never
    math_verify_timeout: float = 5.0  # seconds per answer inside the math reward

    # -- loss (the loss options themselves are added here from opo_kernels.options) --------------
    loss_impl: str = "fused"       # fused (opo_kernels, no logits) | naive (materialized logits)
    kernel_backend: str = "auto"   # opo_kernels backend=
    adv_scale: str = "auto"        # auto (the loss type's: none for dr_grpo, else group) | group | batch | none
    dynamic_sampling: str = "auto" # auto (the loss type's: on for dapo) | true | false: drop all-equal groups
    dynamic_sampling_max_rounds: int = 3  # extra sampling rounds to refill the kept groups (DAPO)
    dynamic_sampling_metric: str = "accuracy"  # what must differ in a kept group: accuracy |
    #                                 reward | shaped_reward (after overlong shaping) | a reward function's name
    overlong_buffer: int = -1      # DAPO soft overlong penalty window; -1 = max_new_tokens // 4
    overlong_penalty: float = 1.0  # DAPO: reward penalty at the end of the overlong window
    overlong_filter: bool = False  # DAPO: mask truncated responses out of the loss

    # -- optimization ---------------------------------------------------------------------------
    lr: float = 3e-4  # learning rate of the RL phase (TRL: learning_rate)
    weight_decay: float = 0.0  # AdamW weight decay
    adam_beta1: float = 0.9  # AdamW beta1
    adam_beta2: float = 0.99  # AdamW beta2
    adam_eps: float = 1e-8  # AdamW epsilon
    warmup_steps: int = 0  # linear learning-rate warm-up over this many steps
    lr_schedule: str = "constant"  # constant | cosine (to lr_min_ratio * lr at the last step)
    lr_min_ratio: float = 0.1  # cosine: the last step's lr as a share of lr
    grad_clip: float = 1.0         # 0 = no clipping (the norm is still logged)
    minibatches: int = 2           # optimizer steps per rollout batch, anchor frozen for all
    ppo_epochs: int = 1            # passes over the rollout batch

    # -- supervised warm start (its own phase, on a split disjoint from the RL prompts) ------------
    sft_steps: int = 0  # supervised warm-start steps before RL (toy task only)
    sft_batch_size: int = 64  # warm start: examples per step
    sft_lr: float = 1e-3  # warm start: peak learning rate

    # -- logging and checkpoints ----------------------------------------------------------------
    log_every: int = 1  # steps between console lines (metrics.jsonl gets every step)
    save_every: int = 0            # steps between checkpoints; 0 = only the final one
    keep_checkpoints: int = 2  # the newest this many checkpoints are kept
    export_hf: bool = True  # write hf_model/ (from_pretrained) at the end
    plot: bool = True  # write metrics.png at the end
    tensorboard: bool = True       # false: no TensorBoard even when report_to names it
    report_to: list = field(default_factory=lambda: ["tensorboard"])  # tensorboard | wandb | none
    wandb_project: str = "opo"     # wandb runs offline unless WANDB_API_KEY / WANDB_MODE say otherwise
    log_completions_every: int = 0 # steps between tables of sample completions; 0 = never
    log_completions_count: int = 4 # samples per table (completions.jsonl, console, wandb)

    # -- derived helpers ------------------------------------------------------------------------
    def loss_options(self) -> LossOptions:
        """The loss options of this run (``max_completion_length``: ``max_new_tokens``)."""
        return LossOptions(**{k: getattr(self, k) for k in LOSS_OPTION_KEYS},
                           max_completion_length=self.max_new_tokens)

    def effective_adv_scale(self) -> str:
        if self.adv_scale != "auto":
            return self.adv_scale
        return self.loss_options().kind.adv_scale

    def use_dynamic_sampling(self) -> bool:
        if self.dynamic_sampling == "auto":
            return self.loss_options().kind.dynamic_sampling
        return self.dynamic_sampling == "true"

    def effective_overlong_buffer(self) -> int:
        return self.max_new_tokens // 4 if self.overlong_buffer < 0 else self.overlong_buffer

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # -- validation -----------------------------------------------------------------------------
    def problems(self) -> list[str]:
        """Every rule this configuration breaks, one message per key (nothing is checked twice:
        the loss options by opo_kernels, the rest here)."""
        out: list[str] = []

        def bad(key, why):
            out.append(f"config key {key!r}: {why}, got {getattr(self, key)!r}")

        def choice(key, options):
            if getattr(self, key) not in options:
                bad(key, f"must be one of {tuple(options)}")

        choice("loss_impl", ("fused", "naive"))
        choice("kernel_backend", BACKENDS)
        if self.is_correction is None:
            for key in ("is_clip_max", "is_clip_min"):
                if getattr(self, key) != _FIELDS[key].default:
                    bad(key, "bounds the importance weights of is_correction, which is not set "
                             "(is_correction: token_truncate | token_mask | sequence_truncate | "
                             "sequence_mask)")
        # The loss options' rules live with the loss: opo_kernels checks them, naming the key.
        try:
            check_options(LossOptions(**{k: getattr(self, k) for k in LOSS_OPTION_KEYS}))
        except (TypeError, ValueError) as e:  # its messages start with the option's name
            key = re.match(r"[a-z_]+", str(e)).group(0)
            out.append(f"config key {key!r}: {e}")
        choice("adv_scale", ("auto", "group", "batch", "none"))
        choice("dynamic_sampling", ("auto", "true", "false"))
        choice("engine", ("hf", "vllm"))
        choice("reward_isolation", ("process", "thread"))
        choice("task", ("toy", "math", "hf"))
        choice("toy_task", ("add", "reverse"))
        choice("lr_schedule", ("constant", "cosine"))
        choice("truncate", ("error", "left", "right"))
        if not 0.0 <= self.lr_min_ratio <= 1.0:
            bad("lr_min_ratio", "must be in [0, 1]")
        choice("dtype", ("auto", "float32", "bfloat16"))
        choice("device", ("auto", "cpu", "cuda"))
        choice("packed", ("auto", "true", "false"))
        if self.chat_template not in ("auto", "true", "false") and "{" not in self.chat_template:
            bad("chat_template", "must be auto, true, false or a Jinja chat template")
        choice("attn_implementation", ("auto", "sdpa", "eager", "flash_attention_2"))
        for key in ("temperature", "lr", "sft_lr", "reward_timeout", "math_verify_timeout"):
            if not getattr(self, key) > 0:
                bad(key, "must be > 0")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", "must be in (0, 1]")
        if not 0.0 < self.train_fraction <= 1.0:
            bad("train_fraction", "must be in (0, 1]")
        for key in ("prompts_per_step", "max_new_tokens", "minibatches", "ppo_epochs", "log_every",
                    "sft_batch_size", "max_prompt_length", "toy_digits", "tensor_parallel_size"):
            if getattr(self, key) < 1:
                bad(key, "must be >= 1")
        if self.tensor_parallel_size > 1:  # the vocabulary-split head (the model's rules: preflight)
            if self.loss_impl != "fused":
                bad("loss_impl", "tensor_parallel_size > 1 splits the head's vocabulary, which "
                                 "only the fused loss takes (naive needs the whole head)")
            if not self.fsdp:
                bad("fsdp", "tensor_parallel_size > 1 needs fsdp=true (several processes)")
            if self.lora_r:
                bad("lora_r", "LoRA is not supported with tensor_parallel_size > 1")
        for key in ("cpu_threads", "max_steps", "save_every", "val_every", "sft_steps", "warmup_steps",
                    "keep_checkpoints", "val_size", "weight_decay", "grad_clip", "epochs",
                    "reward_max_failed_steps", "zero_signal_steps", "lora_r",
                    "log_completions_every", "log_completions_count", "dynamic_sampling_max_rounds"):
            if getattr(self, key) < 0:
                bad(key, "must be >= 0")
        if self.group_size < 2:
            bad("group_size", "must be >= 2 (group advantages need two samples per prompt)")
        if self.minibatches >= 1 and self.prompts_per_step % self.minibatches:
            bad("minibatches", f"must divide prompts_per_step={self.prompts_per_step}")
        if self.max_steps == 0 and self.epochs == 0:
            bad("max_steps", "one of max_steps / epochs must be > 0")
        if self.max_steps == 0 and self.task == "toy":
            bad("max_steps", "the toy task is infinite: set max_steps")
        if self.task in ("math", "hf") and not self.train_file:
            bad("train_file", f"task {self.task!r} needs a train_file (a local file or dataset directory)")
        if self.val_every and not (self.val_file or self.task == "toy"):
            bad("val_file", "val_every > 0 needs a val_file")
        if self.sft_steps and self.task != "toy":
            bad("sft_steps", "the warm start is only defined for task 'toy'")
        if self.keep_checkpoints < 1:
            bad("keep_checkpoints", "must be >= 1")
        if not 0.0 < self.adam_beta1 < 1.0 or not 0.0 < self.adam_beta2 < 1.0:
            bad("adam_beta1", "betas must be in (0, 1)")
        if not 0.0 <= self.lora_dropout < 1.0:
            bad("lora_dropout", "must be in [0, 1)")
        if self.lora_r and not self.lora_target_modules:
            bad("lora_target_modules", "lora_r > 0 needs at least one module name")
        for dest in self.report_to:
            if dest not in ("tensorboard", "wandb", "none"):
                out.append(f"config key 'report_to': {dest!r} is not one of tensorboard, wandb, "
                           f"none (got {self.report_to!r})")
        if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w)
                   for w in self.reward_weights):
            bad("reward_weights", "must be numbers, one per reward function")
        if self.resume and self.overwrite:
            bad("overwrite", "contradicts resume=true (continue the run, or delete it: not both)")
        return out

    def validate(self) -> "Config":
        """This configuration, or :class:`ConfigError` listing every rule it breaks."""
        errors = self.problems()
        if errors:
            raise ConfigError.of(errors)
        return self


_FIELDS = {f.name: f for f in dataclasses.fields(Config)}
# Config keys that are options of the loss itself (same names as opo_kernels' LossOptions); the
# trainer's group_size (the G of each prompt group) is passed to the loss too.
LOSS_OPTION_KEYS = tuple(o.name for o in LOSS_OPTIONS if o.name in _FIELDS)
_HINTS = typing.get_type_hints(Config)


def _check_type(key: str, value: Any) -> Any:
    """Coerce ``value`` to the declared type of ``key`` or raise naming the key."""
    hint = _HINTS[key]
    optional = typing.get_origin(hint) is typing.Union and type(None) in typing.get_args(hint)
    if optional:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, bool):  # yaml turns "true" into a bool; string options keep the word
            return "true" if value else "false"
        if isinstance(value, (str, int, float)):
            return str(value)
    elif hint is list:
        if isinstance(value, list):
            return value
        if isinstance(value, str) and "," in value:  # a,b on the command line: [a, b]
            return [yaml.safe_load(x) if x.strip() else "" for x in value.split(",")]
        if isinstance(value, (str, int, float)):
            return [value]
    elif hint is dict:
        if isinstance(value, dict):
            return value
    raise ConfigError(f"config key {key!r} expects {getattr(hint, '__name__', hint)}, "
                     f"got {value!r} ({type(value).__name__})")


# TRL's GRPOConfig names (and a few of verl's) for the same settings: accepted as aliases.
ALIASES = {
    "learning_rate": "lr", "num_generations": "group_size", "max_completion_length": "max_new_tokens",
    "epsilon": "clip_eps_low", "epsilon_high": "clip_eps_high", "num_iterations": "ppo_epochs",
    "max_grad_norm": "grad_clip", "lr_scheduler_type": "lr_schedule", "logging_steps": "log_every",
    "save_steps": "save_every", "save_total_limit": "keep_checkpoints",
    "num_train_epochs": "epochs", "reward_funcs": "rewards", "loss_type": "loss",
    "scale_rewards": "adv_scale", "adam_epsilon": "adam_eps", "mask_truncated_completions":
    "overlong_filter", "vllm_tensor_parallel_size": "tensor_parallel_size",
    "model_name_or_path": "model", "dataset_name": "train_file", "use_liger_loss": None,
    "per_device_train_batch_size": None,
}
# TRL's completions per device per optimizer step: prompts_per_step follows from it (below).
_PER_DEVICE_BATCH = "per_device_train_batch_size"


def _unknown(key: str) -> str:
    names = list(_FIELDS) + [a for a, k in ALIASES.items() if k]
    close = difflib.get_close_matches(key, names, n=3, cutoff=0.6)
    # Abbreviations: the initials of the words typed (learnin_rate -> lr), and a known key the
    # typed one starts or ends with.
    initials = "".join(w[0] for w in key.split("_") if w)
    extra = [k for k in _FIELDS if k == initials or (len(k) > 3 and (key.startswith(k) or key.endswith(k)))]
    seen = []
    for c in close + extra:
        name = ALIASES.get(c) or c
        if name not in seen:
            seen.append(name)
    hint = f"; did you mean {', '.join(seen[:3])}?" if seen else ""
    return f"unknown config key {key!r}{hint} (opo-train --help lists every key)"


def apply(cfg: Config, updates: dict, source: str = "", errors: list | None = None) -> Config:
    """Set every ``key: value`` of ``updates`` on ``cfg`` with type checks (``a.b`` for dicts;
    TRL's names through ``ALIASES``). Problems go to ``errors`` when given (all keys are tried),
    else the first one raises."""
    own = errors is None
    errors = [] if own else errors
    where = f" (in {source})" if source else ""
    for key, value in updates.items():
        top, _, sub = str(key).partition(".")
        if top == _PER_DEVICE_BATCH:
            try:
                cfg.__dict__["_per_device_batch"] = _check_type("prompts_per_step", value)
            except ConfigError:
                errors.append(f"config key {top!r} expects int, got {value!r}{where}")
            continue
        if top in ALIASES:
            if ALIASES[top] is None:
                errors.append(f"config key {top!r} (TRL) has no counterpart here{where}")
                continue
            top = ALIASES[top]
        if top not in _FIELDS:
            errors.append(_unknown(top) + where)
            continue
        if sub:
            if _HINTS[top] is not dict:
                errors.append(f"config key {top!r} is not a mapping; cannot set {key!r}")
                continue
            getattr(cfg, top)[sub] = value
            continue
        try:
            setattr(cfg, top, _check_type(top, value))
        except ConfigError as e:
            errors.append(f"{e}{where}")
    if own and errors:
        raise ConfigError.of(errors)
    return cfg


def _per_device_batch(cfg: Config, errors: list) -> None:
    """TRL's ``per_device_train_batch_size`` B (completions per device per optimizer step):
    prompts_per_step = B x data-parallel processes x minibatches / group_size, which must be whole."""
    b = cfg.__dict__.pop("_per_device_batch", None)
    if b is None:
        return
    import os
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.tensor_parallel_size > 1 and world % cfg.tensor_parallel_size == 0:
        world //= cfg.tensor_parallel_size  # a tensor-parallel group works on the same completions
    n = b * world * cfg.minibatches
    if b < 1 or cfg.group_size < 1 or n % cfg.group_size:
        errors.append(f"config key {_PER_DEVICE_BATCH!r}: {b} completions x {world} process(es) x "
                      f"{cfg.minibatches} minibatches must be a multiple of group_size="
                      f"{cfg.group_size}")
        return
    cfg.prompts_per_step = n // cfg.group_size


def key_docs() -> dict[str, tuple[Any, str]]:
    """``key -> (default, doc)`` for every config key, the doc being the comment written beside
    its field in :class:`Config` (one place for both)."""
    import ast
    import inspect
    import io
    import tokenize
    src = inspect.getsource(Config)
    starts = {}
    for node in ast.parse(src).body[0].body:
        if isinstance(node, ast.AnnAssign):
            starts[node.lineno] = node.target.id
    comments: dict[str, list[str]] = {}
    current = None
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        line = tok.start[0]
        if line in starts:
            current = starts[line]
        if tok.type == tokenize.COMMENT and current and not tok.string.startswith("# --"):
            text = tok.string.lstrip("#").strip()
            if text and not (tok.start[1] <= 4 and not tok.line[:tok.start[1]].strip() and
                             line not in starts and not tok.string.startswith("#  ")):
                comments.setdefault(current, []).append(text)
        if tok.type == tokenize.NAME and tok.string == "def":
            current = None
    docs = {o.name: f"{o.doc} ({o.rule.text()})" for o in LOSS_OPTIONS}
    out = {}
    for f in dataclasses.fields(Config):
        default = f.default_factory() if callable(f.default_factory) else f.default
        out[f.name] = (default, docs.get(f.name) or " ".join(comments.get(f.name, [])))
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` -> (key, YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # Keep the literal text for string keys so "output_dir=1e3" stays "1e3".
    if key in _HINTS and _HINTS[key] is str and not isinstance(value, bool):
        value = raw
    return key, value


def resolve_config_path(path: str, relative_to: Path | None = None) -> Path:
    """A path as given (or relative to the YAML that names it), or the name of a shipped config
    (``toy``, ``exp1_...``)."""
    p = Path(path)
    cands = [p]
    if relative_to is not None and not p.is_absolute():
        cands.insert(0, relative_to / p)
    cands += [CONFIG_DIR / path, CONFIG_DIR / f"{path}.yaml"]
    for cand in cands:
        if cand.is_file():
            return cand
    shipped = sorted(q.stem for q in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"config file {path!r} not found (shipped configs: {shipped})")


def _read_yaml(p: Path) -> dict:
    try:
        with open(p) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
        raise ConfigError(f"config file {str(p)!r} is not valid YAML{at}: "
                          f"{getattr(e, 'problem', None) or e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {str(p)!r} cannot be read: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of keys, got {type(data).__name__}")
    return data


def _layers(p: Path, chain: tuple = ()) -> list[tuple[Path, dict]]:
    """The YAML files to apply, base first: a file may name its base config with ``base:``
    (a shipped name such as ``toy``, or a path, relative to the file)."""
    if p.resolve() in chain:
        names = " -> ".join(str(c) for c in (*chain, p.resolve()))
        raise ConfigError(f"config key 'base': the bases form a cycle ({names})")
    data = _read_yaml(p)
    base = data.pop("base", None)
    if base is None:
        return [(p, data)]
    if not isinstance(base, str) or not base:
        raise ConfigError(f"config key 'base' (in {p}): must name a config file or a shipped "
                          f"config, got {base!r}")
    try:
        bp = resolve_config_path(base, relative_to=p.parent)
    except ConfigError as e:
        raise ConfigError(f"config key 'base' (in {p}): {e}") from None
    return _layers(bp, (*chain, p.resolve())) + [(p, data)]


def load_config(path: str | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Defaults <- YAML file (default: the shipped toy config; its ``base:`` first, recursively)
    <- overrides; validated. Every problem found is reported in one :class:`ConfigError`."""
    cfg = Config()
    errors: list[str] = []
    for p, data in _layers(resolve_config_path(path or "toy")):
        apply(cfg, data, source=str(p), errors=errors)
    if isinstance(overrides, dict):
        apply(cfg, overrides, source="overrides", errors=errors)
    else:
        for text in overrides or []:
            try:
                k, v = parse_override(text)
            except ConfigError as e:
                errors.append(str(e))
                continue
            apply(cfg, {k: v}, source=f"override {text!r}", errors=errors)
    _per_device_batch(cfg, errors)
    errors += cfg.problems()
    if errors:
        err = ConfigError.of(errors)
        err.config = cfg  # what could be read: the command line checks the rest against it
        raise err
    return cfg
