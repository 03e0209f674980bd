"""opo's fused loss inside TRL (>= 1.16): ``OPOConfig`` and ``OPOTrainer``.

``OPOTrainer`` is a ``trl.GRPOTrainer`` whose ``compute_loss`` runs the model's backbone to the last
hidden states and calls :func:`opo_kernels.fused_policy_loss` with the LM-head weight — no
(B, T, V) logits — through TRL's forward redirection (so DDP/FSDP/ZeRO-3 see a forward of the
wrapped model) and with the head gathered as TRL's own fused head does (FSDP2 DTensor, ZeRO-3).
Generation, rewards, advantages and logging are TRL's.

Loss types (``OPOConfig.loss_type``):

- ``"opo"`` (the default here): paper-mode OPO; options ``opo_alpha``, ``opo_mu``, ``opo_tau``,
  ``opo_level``, ``opo_seq_reduce``, ``opo_ratio``, ``opo_normalize``, ``opo_max_log_ratio``,
  ``opo_ref_correction`` (opo's options of the same names, see ``docs/contract.md``). The escort
  weights ω are computed once per generation batch (over every rank) when it is generated and
  handed to each micro-batch (opo's ``omega=``), and the loss is normalized by the generation
  batch's sequence (token, for ``opo_level="token"``) count, so ``steps_per_generation > 1`` and
  gradient accumulation give the update of one call on the whole batch.
- TRL's own, through opo's fused losses, equal to stock ``GRPOTrainer`` (tested): ``"grpo"``,
  ``"dapo"``, ``"bnpo"``, ``"dr_grpo"``, ``"cispo"``, ``"sapo"``, ``"luspo"``, ``"vespo"``, and GSPO as
  ``loss_type="grpo", importance_sampling_level="sequence"``; ``importance_sampling_level="sequence"``
  with the other clipped losses (opo's ``ratio_level="sequence"``); ``epsilon`` / ``epsilon_high`` are
  passed as ``clip_eps_low`` / ``clip_eps_high`` (``cispo``: ``epsilon_high`` is the ratio cap),
  ``delta`` as ``clip_delta``, ``vespo_*`` as opo's options of the same names;
  ``num_iterations > 1`` and gradient accumulation are honoured (TRL's normalizers,
  ``num_items_in_batch`` for ``dapo`` / ``cispo`` / ``vespo``).

TRL's terms, inside opo's pass: ``beta`` (k3 KL to the reference model, with
``use_bias_correction_kl``), vLLM's importance-sampling correction (``use_vllm`` with
``vllm_importance_sampling_correction``: opo's ``is_correction`` = ``vllm_importance_sampling_mode``,
``is_clip_max`` / ``is_clip_min`` = ``vllm_importance_sampling_clip_max`` / ``_min``; the rollout
log-probs are TRL's ``sampling_per_token_logps``, a NaN one (unscored by vLLM) counting as no
mismatch, as in TRL), ``off_policy_mask_threshold`` (against ``sampling_per_token_logps`` when there
are any, else the anchor; an unscored token counts as the anchor's, where TRL counts it as no
evidence), ``entropy_coef``, ``use_adaptive_entropy`` (TRL's controller, state and checkpoint
included) and ``top_entropy_quantile``; the MoE router load-balancing loss (``router_aux_loss_coef``,
the model module's ``load_balancing_loss_func`` on the backbone's router logits). TRL's metric names
are logged (``entropy``, ``clip_ratio/region_mean``, ``cispo_clip_ratio``, ``vespo/phi_seq_mean``,
``kl``, ``policy_loss`` and ``entropy_coef`` with an entropy bonus, ``aux_loss``), plus opo's own
(``opo/...``).

``OPOConfig`` checks every field opo reads when it is built (``epsilon``, ``epsilon_high``, ``delta``,
``beta``, ``temperature``, the vLLM IS mode and bounds, ``entropy_coef``, ``top_entropy_quantile``,
``off_policy_mask_threshold``, the SAPO and VESPO parameters, ``opo_backend`` and the ``opo_*``
options) by opo's rules, the error naming TRL's field.

Raised at construction (naming the field and what to do instead): ``opo_norm_scope="group"`` /
``opo_escort="group_softmax"`` (TRL shuffles the generation batch, so a micro-batch holds no whole
groups), ``entropy_coef`` with ``top_entropy_quantile < 1`` for ``dapo`` / ``cispo`` / ``opo`` (TRL's
entropy mean over a micro-batch's masked tokens against a generation-batch normalizer),
``use_adaptive_entropy`` with ``top_entropy_quantile < 1``, ``vespo`` with vLLM importance sampling
(TRL folds the IS log-ratios of padded positions into its weights) or with
``importance_sampling_level="sequence"``, ``use_liger_kernel``; a PEFT adapter on the LM head, a model
whose head transform opo cannot apply (a multiplier or softcap that is not a finite number > 0), an
MoE model whose module has no ``load_balancing_loss_func``, an OPO option given with another loss
type.

The model's own logit transform is applied in opo's vocabulary pass, as its forward applies it
before TRL divides by ``temperature``: ``final_logit_softcapping`` (Gemma-2/3 and relatives) is
``softcap``; ``logit_scale`` (Cohere), ``lm_head_multiplier`` (Falcon-H1), ``output_multiplier``
(multiplied before the softcap) and ``1 / logits_scaling`` (Granite) multiply into ``logit_scale``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from . import head_transform, require

_trl = require("trl", "1.16", "trl")
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from opo_kernels import escort_weights, fused_policy_loss, policy_loss  # noqa: E402
from opo_kernels.checks import check_backend_options, check_options  # noqa: E402
from opo_kernels.options import (ESCORT_OPTIONS, LOSS_OPTIONS, LOSSES, OPTIONS_BY_NAME,  # noqa: E402
                                 Agg, BackendOptions, LossOptions, counts_read)

__all__ = ["OPOConfig", "OPOTrainer"]

# OPOConfig's own fields (opo_<option>) -> opo option: the options declared with an "opo_" TRL field
_OPO_FIELDS = {o.trl: o.name for o in LOSS_OPTIONS if o.trl and o.trl.startswith("opo_")}
# TRL's fields -> opo option, for the options TRL has fields of its own for
_TRL_FIELDS = {o.trl: o.name for o in LOSS_OPTIONS if o.trl and not o.trl.startswith("opo_")}
# TRL's loss types that are opo's loss under another name at importance_sampling_level="sequence"
_SEQUENCE_LEVEL = {"grpo": "gspo"}
_SUPPORTED = tuple(name for name in LOSSES if name not in _SEQUENCE_LEVEL.values())
# TRL's loss types whose normalizer is TRL's num_items_in_batch (the generation batch's tokens)
_TRL_NUM_ITEMS = ("dapo", "cispo", "vespo")
# TRL's name of the clip-slot metric of each loss type (sapo: none)
_TRL_CLIP_METRIC = {"grpo": "clip_ratio/region_mean", "dapo": "clip_ratio/region_mean",
                    "bnpo": "clip_ratio/region_mean", "dr_grpo": "clip_ratio/region_mean",
                    "luspo": "clip_ratio/region_mean", "cispo": "cispo_clip_ratio",
                    "vespo": "vespo/phi_seq_mean"}
_NOT_IN_OPO = "is not in opo"
# the options TRL sets per call (the adaptive entropy coefficient, vLLM's importance sampling)
_PER_CALL = ("entropy_coef", "is_correction", "is_clip_max", "is_clip_min")


def _clip_delta_losses() -> list:
    return [lt for lt in _SUPPORTED if "clip_delta" in LossOptions(loss=lt).kind.reads]


def _with_opo_fields(cls):
    """Add OPOConfig's ``opo_<option>`` fields from their declarations (type, default, doc)."""
    for o in LOSS_OPTIONS:
        if o.trl in _OPO_FIELDS:
            cls.__annotations__[o.trl] = o.rule.hint()
            setattr(cls, o.trl, field(default=o.default, metadata={"help": f"{o.doc} ({o.rule.text()})."}))
    return cls


@dataclass
@_with_opo_fields
class OPOConfig(GRPOConfig):
    """``trl.GRPOConfig`` plus ``loss_type="opo"`` (the default) and OPO's options: a field
    ``opo_<option>`` for each OPO option (``opo_alpha``, ``opo_mu``, ``opo_tau``, ``opo_level``, ...;
    declared in :data:`opo_kernels.options.LOSS_OPTIONS`, docs/contract.md "Options"), and
    ``opo_backend``, opo's backend ("auto": Triton on CUDA, native C++ on CPU).
    """

    loss_type: str = field(default="opo", metadata={"help": f"'opo' or one of TRL's: {', '.join(_SUPPORTED[1:])}."})
    opo_backend: str = field(default="auto", metadata={"help": "opo backend: auto, native, torch, triton, fused."})

    def __post_init__(self):
        self._check_before()
        super().__post_init__()
        self._check_after()

    def opo_options(self) -> dict:
        return {opt: getattr(self, f) for f, opt in _OPO_FIELDS.items()}

    def _kind(self):
        """opo's loss type for this config (:class:`opo_kernels.options.LossType`)."""
        return LossOptions(loss=self.loss_name(), **self.opo_options()).kind

    def _check_before(self):
        lt = self.loss_type
        if lt not in _SUPPORTED:
            raise ValueError(f"OPOConfig: unknown loss_type={lt!r}; supported: {_SUPPORTED}")
        reads = LossOptions(loss=self.loss_name()).kind.reads
        if self.importance_sampling_level != "token" and "ratio_level" not in reads \
                and lt not in _SEQUENCE_LEVEL:
            raise ValueError(f"OPOConfig: importance_sampling_level does not apply to loss_type={lt!r} "
                             f"(its ratio is its own{'; use opo_level' if 'level' in reads else ''}); "
                             f"leave it 'token' (got {self.importance_sampling_level!r})")
        if "is_correction" not in reads and self.use_vllm and self.vllm_importance_sampling_correction:
            raise NotImplementedError(f"OPOTrainer: loss_type={lt!r} with vLLM importance sampling "
                                      "(use_vllm, vllm_importance_sampling_correction) is not in opo: TRL folds the "
                                      "IS log-ratios of every position, padding included, into its sequence "
                                      "weights; set vllm_importance_sampling_correction=False")
        unsupported = [
            ("top_entropy_quantile", bool(self.use_adaptive_entropy) and self.top_entropy_quantile < 1.0,
             "with use_adaptive_entropy: TRL's controller measures the entropy of the masked tokens"),
            ("top_entropy_quantile", (lt in ("dapo", "cispo") or "level" in reads) and self.entropy_coef != 0.0
             and self.top_entropy_quantile < 1.0,
             f"with entropy_coef and loss_type={lt!r}: TRL's entropy mean over a micro-batch's masked tokens"),
        ]
        for name, bad, what in unsupported:
            if bad:
                raise NotImplementedError(f"OPOTrainer: {name}={getattr(self, name)!r} ({what}) {_NOT_IN_OPO}; "
                                          f"leave {name} at its default")
        if getattr(self, "use_liger_kernel", False):
            raise ValueError("OPOTrainer: use_liger_kernel=True conflicts with opo's fused loss; leave it False")
        if self.delta is not None and "clip_delta" not in reads:
            raise ValueError(f"OPOConfig: delta={self.delta!r} (two-sided clip) applies to the clipped losses "
                             f"{', '.join(_clip_delta_losses())}, got loss_type={lt!r}; leave it None")
        defaults = OPOConfig.__dataclass_fields__
        for f, opt in _OPO_FIELDS.items():
            if opt not in reads and getattr(self, f) != defaults[f].default:
                raise ValueError(f"OPOConfig: {f}={getattr(self, f)!r} is an OPO option, but "
                                 f"loss_type={lt!r} does not read it; leave it at its default")
        if self.opo_norm_scope != "batch" or self.opo_escort != "paper":
            raise NotImplementedError("OPOTrainer: opo_norm_scope='group' and opo_escort='group_softmax' need "
                                      "whole prompt groups in each micro-batch, which TRL's shuffled generation "
                                      "batch does not give; use opo_norm_scope='batch', opo_escort='paper'")
        if "level" in reads:  # an OPO loss type: its options, by opo's rules
            z = torch.zeros(2, 1)
            try:
                policy_loss(z, z, torch.zeros(2), loss=self.loss_name(), **self.opo_options())
            except (ValueError, TypeError) as e:
                raise ValueError(f"OPOConfig: bad OPO option (opo_<name>): {e}") from e

    def loss_name(self) -> str:
        """opo's loss for this config (GSPO is TRL's ``grpo`` at ``importance_sampling_level="sequence"``)."""
        if self.importance_sampling_level == "sequence" and self.loss_type in _SEQUENCE_LEVEL:
            return _SEQUENCE_LEVEL[self.loss_type]
        return self.loss_type

    def loss_fields(self) -> dict:
        """The TRL fields opo's loss reads, as ``{opo option: (TRL field, value)}``: those of the
        options declared with a TRL field (:data:`opo_kernels.options.LOSS_OPTIONS`) that this loss
        type reads, where they differ from opo's default (the OPO options are :meth:`opo_options`;
        the entropy coefficient and vLLM's importance sampling are set per call)."""
        reads = LossOptions(loss=self.loss_name()).kind.reads
        out = {}
        for f, opt in _TRL_FIELDS.items():
            if opt not in reads or opt in _PER_CALL:
                continue
            v = getattr(self, f)
            if f == "epsilon_high" and v is None:  # TRL: epsilon_high defaults to epsilon
                f, v = "epsilon", self.epsilon
            if v != OPTIONS_BY_NAME[opt].default:
                out[opt] = (f, v)
        if "beta" not in out:  # the bias correction is read with beta > 0 only
            out.pop("use_bias_correction_kl", None)
        return out

    def _check_after(self):
        # every field opo reads, checked by opo's own rules and reported under TRL's name
        name = self.loss_name()
        fields_ = dict(self.loss_fields())
        fields_["entropy_coef"] = ("entropy_coef", self.entropy_coef)
        fields_["top_entropy_quantile"] = ("top_entropy_quantile", self.top_entropy_quantile)
        fields_["beta"] = ("beta", self.beta)
        is_fields = {"is_correction": ("vllm_importance_sampling_mode", self.vllm_importance_sampling_mode),
                     "is_clip_max": ("vllm_importance_sampling_clip_max", self.vllm_importance_sampling_clip_max),
                     "is_clip_min": ("vllm_importance_sampling_clip_min", self.vllm_importance_sampling_clip_min)}
        if self.vllm_importance_sampling_correction and "is_correction" in LossOptions(loss=name).kind.reads:
            fields_.update(is_fields)

        def run(check, trl_fields):
            try:
                check()
            except (ValueError, TypeError) as e:
                named = ", ".join(f"{f}={v!r}" for f, v in trl_fields)
                raise type(e)(f"OPOConfig: {named}: {e}") from e

        for opt, (f, v) in fields_.items():
            if opt == "use_bias_correction_kl":
                run(lambda: check_options(LossOptions(loss=name, beta=1.0, use_bias_correction_kl=v)), [(f, v)])
            elif opt in ("is_clip_max", "is_clip_min"):
                run(lambda: check_options(LossOptions(loss=name, is_correction="token_truncate", **{opt: v})),
                    [(f, v)])
            else:
                run(lambda: check_options(LossOptions(loss=name, **{opt: v})), [(f, v)])
        # the combination (e.g. the IS bounds' order), named by every field involved
        run(lambda: check_options(LossOptions(loss=name, **{o: v for o, (_, v) in fields_.items()})),
            list(fields_.values()))
        run(lambda: check_backend_options(BackendOptions(temperature=self.temperature)),
            [("temperature", self.temperature)])
        run(lambda: check_backend_options(BackendOptions(backend=self.opo_backend)),
            [("opo_backend", self.opo_backend)])


class OPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` with opo's fused loss (see the module docstring); arguments as GRPOTrainer's,
    ``args`` an :class:`OPOConfig`."""

    def __init__(self, model, reward_funcs=None, args: OPOConfig | None = None, *a, **kw):
        if args is None:
            args = OPOConfig(output_dir="opo-trainer")
        if not isinstance(args, OPOConfig):
            raise TypeError(f"OPOTrainer: args must be an OPOConfig, got {type(args).__name__}")
        super().__init__(model, reward_funcs, args, *a, **kw)
        lm = self._causal_lm(self.model)
        head = lm.get_output_embeddings()
        if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
            raise ValueError("OPOTrainer: the model has no LM head (get_output_embeddings() with a weight)")
        if hasattr(head, "base_layer") or "ModulesToSave" in type(head).__name__ or \
                type(head).__module__.startswith("peft"):
            raise ValueError("OPOTrainer: a PEFT adapter on lm_head would stay untrained — opo's fused loss reads "
                             "lm_head.weight directly; remove 'lm_head' from target_modules / modules_to_save")
        self._head_transform = head_transform(lm.config.get_text_config())
        self._aux_loss_fn = None
        if self.aux_loss_enabled:
            # the MoE load-balancing loss as the model's own forward forms it from the router logits
            import sys
            fn = getattr(sys.modules.get(type(lm).__module__), "load_balancing_loss_func", None)
            if fn is None or not hasattr(lm, "num_experts") or not hasattr(lm, "num_experts_per_tok"):
                raise NotImplementedError(
                    f"OPOTrainer: the MoE router aux loss of {type(lm).__name__} (router_aux_loss_coef="
                    f"{self.router_aux_loss_coef}) is not in opo: its module has no load_balancing_loss_func or "
                    "the model no num_experts / num_experts_per_tok; set router_aux_loss_coef=0")
            self._aux_loss_fn = fn
        self.opo_loss_name = args.loss_name()
        self._opo_kind = kind = args._kind()
        self._escort_options = None
        if kind.escort:
            # ω comes from the generation batch (omega=): the escort options go to escort_weights
            opts = args.opo_options()
            self._escort_options = {k: opts.pop(k) for k in ESCORT_OPTIONS}
            if self._escort_options["ref_correction"]:  # ℓ needs the anchor: ω is formed per call
                opts.update(self._escort_options)
                self._escort_options = None
            self._opo_options = opts
        else:
            self._opo_options = {}
        self._opo_options.update({opt: v for opt, (_, v) in args.loss_fields().items()})
        if kind.aggregate is Agg.MAX_LENGTH:
            self._opo_options["max_completion_length"] = self.max_completion_length
        from trl.models.utils import _ForwardRedirection
        self._opo_redirect = _ForwardRedirection()

    @staticmethod
    def _causal_lm(model):
        if hasattr(model, "get_base_model"):
            return model.get_base_model()
        return model

    def _is_options(self) -> dict:
        """vLLM's importance-sampling correction as opo options (read per call, like TRL)."""
        if not (self.use_vllm and self.vllm_importance_sampling_correction):
            return {}
        return {"is_correction": self.vllm_importance_sampling_mode,
                "is_clip_max": self.vllm_importance_sampling_clip_max,
                "is_clip_min": self.vllm_importance_sampling_clip_min}

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        if self._escort_options is not None:
            # ω once over the generation batch (every rank), carried with each sequence through
            # TRL's shuffle and split into micro-batches; and the batch's counts for the normalizer
            mask = out["completion_mask"] if "tool_mask" not in out else out["completion_mask"] * out["tool_mask"]
            valid = mask.sum(-1) > 0
            pg = torch.distributed.group.WORLD if self.accelerator.num_processes > 1 else None
            eo = {k: v for k, v in self._escort_options.items() if k != "ref_correction"}
            out["opo_omega"] = escort_weights(out["advantages"], valid=valid, process_group=pg, **eo)
            counts = self.accelerator.reduce(torch.stack([valid.sum().float(), mask.sum().float()]),
                                             reduction="sum")
            out["opo_num_seqs"], out["opo_num_items"] = counts[0], counts[1]  # 0-d: not split by TRL
        return out

    def _opo_loss(self, lm, input_ids, attention_mask, targets, advantages, old, mask, process_group, **extra):
        C = targets.size(1)
        aux = None
        with self.accelerator.autocast():
            if self._aux_loss_fn is not None:
                out = lm.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                                    output_router_logits=True)
                aux = self._aux_loss_fn(out.router_logits, lm.num_experts, lm.num_experts_per_tok, attention_mask)
            else:
                out = lm.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hidden = out.last_hidden_state[:, :-1][:, -C:]
        head = lm.get_output_embeddings()
        weight, bias = head.weight, head.bias
        try:
            from torch.distributed.tensor import DTensor
        except ImportError:  # pragma: no cover
            DTensor = ()
        if isinstance(weight, DTensor):
            weight = weight.full_tensor()
            bias = bias.full_tensor() if isinstance(bias, DTensor) else bias
        hidden = hidden.to(weight.device)
        ctx = contextlib.nullcontext()
        try:
            from trl.trainer.utils import maybe_gather_lm_head_ctx
            ctx = maybe_gather_lm_head_ctx(weight, bias)
        except ImportError:  # pragma: no cover
            pass
        autocast = self.accelerator.autocast()
        if self.args.cast_lm_head_to_fp32:
            hidden, weight = hidden.float(), weight.float()
            bias = bias.float() if bias is not None else None
            autocast = torch.autocast(hidden.device.type, enabled=False)
        with ctx, autocast:
            loss, m = fused_policy_loss(hidden, weight, targets, advantages, old, mask, loss=self.opo_loss_name,
                                        bias=bias, temperature=self.temperature, backend=self.args.opo_backend,
                                        process_group=process_group, **self._head_transform,
                                        **self._opo_options, **extra)
        return loss, m, aux

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError("The OPOTrainer does not support returning outputs")
        for k in ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes", "token_type_ids",
                  "mm_token_type_ids"):
            if inputs.get(k) is not None:
                raise NotImplementedError(f"OPOTrainer: multimodal inputs ({k}) are not supported")
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        advantages = inputs["advantages"]
        if advantages.dim() != 1:
            raise ValueError(f"OPOTrainer: advantages must be one per sequence (B,), got {tuple(advantages.shape)}")
        old = inputs.get("old_per_token_logps")
        mode = "train" if self.model.training else "eval"
        ga = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        process_group = None
        extra = dict(self._is_options())
        if extra:
            if old is None:
                raise ValueError("OPOTrainer: vLLM importance sampling needs old_per_token_logps (TRL computes "
                                 "them whenever the correction is on)")
            samp = inputs["sampling_per_token_logps"]
            # a token vLLM could not score (NaN) counts as no mismatch, as in TRL
            extra["rollout_logps"] = torch.where(torch.isnan(samp), old, samp)
        elif self.args.off_policy_mask_threshold is not None and inputs.get("sampling_per_token_logps") is not None:
            # off-policy masking measures against the rollout engine's log-probs when there are any (TRL);
            # a token vLLM could not score counts as the anchor's (TRL: as no evidence)
            samp = inputs["sampling_per_token_logps"]
            extra["rollout_logps"] = samp if old is None else torch.where(torch.isnan(samp), old, samp)
        if self.args.beta != 0.0:
            extra["ref_logps"] = inputs["ref_per_token_logps"]
        # TRL's entropy bonus: the coefficient of the end of the last optimizer step (the adaptive
        # controller's, applied only while the measured entropy is at or below entropy_target)
        bonus = self.args.entropy_coef != 0.0 or self.args.use_adaptive_entropy
        ent_coef = self.entropy_coef
        if self.args.use_adaptive_entropy and not self._last_world_entropy <= self.args.entropy_target:
            ent_coef = 0.0
        applied = ent_coef
        scale = 1.0 / ga
        # the generation batch's share that this micro-batch normalizes by (TRL's normalizer for
        # num_items_in_batch; the same rescaling for opo's sequence count)
        share = (ga / self.args.steps_per_generation if mode == "train" else 1.0) / self.accelerator.num_processes
        if self.opo_loss_name in _TRL_NUM_ITEMS:
            normalizer = inputs["num_items_in_batch"].clamp(min=1.0) * share
            extra["num_items_in_batch"] = normalizer
            scale = 1.0
            if ent_coef:
                # TRL: entropy mean over this micro-batch's tokens / ga, whatever the policy normalizer
                ent_coef = ent_coef * float(normalizer) / (float(mask.sum().clamp(min=1.0)) * ga)
        elif self._opo_kind.escort and "opo_omega" in inputs:
            extra["omega"] = inputs["opo_omega"]
            n_seqs, n_items = inputs["opo_num_seqs"], inputs["opo_num_items"]
            extra["num_seqs_in_batch"] = float(n_seqs.clamp(min=1.0)) * share
            extra["num_items_in_batch"] = float(n_items.clamp(min=1.0)) * share
            scale = 1.0
            if ent_coef:
                ent_coef = ent_coef * extra["num_items_in_batch"] / (float(mask.sum().clamp(min=1.0)) * ga)
        elif self._opo_kind.escort:
            # a batch not generated by this trainer (no ω of its generation batch): ω over this call
            extra.update(self._escort_options or {})
            if self.accelerator.num_processes > 1:
                process_group = torch.distributed.group.WORLD  # ω over every rank of the call
        if ent_coef:
            extra["entropy_coef"] = ent_coef
        # the global counts go only to a loss that divides by them
        reads = counts_read(LossOptions(**{"loss": self.opo_loss_name, **self._opo_options,
                                           "entropy_coef": float(ent_coef or 0.0)}))
        for key, read in zip(("num_items_in_batch", "num_seqs_in_batch"), reads):
            if not read:
                extra.pop(key, None)
        lm = self._causal_lm(self.accelerator.unwrap_model(model))
        loss, m, aux = self._opo_redirect(model, lm, self._opo_loss, lm, input_ids, attention_mask,
                                          completion_ids, advantages, old, mask.bool(), process_group, **extra)
        loss = loss * scale
        self._log_opo_metrics(mode, m)
        if bonus:
            self._entropy_bonus_step(mode, loss, m, applied, ga, scale)
        if aux is not None:  # TRL: coef · aux / the accumulation steps, after the policy terms
            loss = loss + self.router_aux_loss_coef * aux / ga
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux.detach()).mean().item())
        return loss

    def _entropy_bonus_step(self, mode, loss, m, applied, ga, scale):
        """TRL's metrics of the entropy bonus (policy_loss: the loss without the bonus, in TRL's
        normalization; entropy_coef) and its adaptive controller's step. The bonus is the mean entropy
        of this micro-batch's valid tokens / ga (top_entropy_quantile = 1, checked at construction)."""
        ent_sum, ntok = (m["entropy"] * m["num_tokens"]).detach(), m["num_tokens"].detach()
        h = ent_sum / ntok.clamp(min=1.0)
        if self.args.top_entropy_quantile == 1.0:  # else the bonus's tokens are the masked ones: not logged
            policy = (loss.detach() + applied * h / ga) / scale
            self._metrics[mode]["policy_loss"].append(self.accelerator.gather(policy).nanmean().item())
        if self.args.use_adaptive_entropy and mode == "train":
            stats = torch.stack([ent_sum, ntok.float()])
            self._entropy_window_stats = stats if self._entropy_window_stats is None else \
                self._entropy_window_stats + stats
            if self.accelerator.sync_gradients:
                window = self.accelerator.reduce(self._entropy_window_stats, reduction="sum")
                world_entropy = (window[0] / window[1].clamp(min=1.0)).item()
                a = self.args
                if world_entropy <= a.entropy_target:
                    self.entropy_coef = min(self.entropy_coef + a.entropy_coef_delta, a.entropy_coef_max)
                else:
                    self.entropy_coef = max(self.entropy_coef - a.entropy_coef_delta, a.entropy_coef_min)
                self._last_world_entropy = world_entropy
                self._entropy_window_stats = None
        if mode == "train" and self.accelerator.sync_gradients:
            self._metrics[mode]["entropy_coef"].append(self.entropy_coef)

    def _log_opo_metrics(self, mode, m):
        def global_mean(value, count):
            t = self.accelerator.reduce(torch.stack([value * count, count]).float(), reduction="sum")
            return (t[0] / t[1].clamp(min=1.0)).item()

        ntok, nseq = m["num_tokens"], m["num_seqs"]
        self._metrics[mode]["entropy"].append(global_mean(m["entropy"], ntok))
        kind = self._opo_kind
        trl_name = _TRL_CLIP_METRIC.get(self.opo_loss_name)
        if trl_name is not None:  # clip_frac is a token mean, vespo_phi_mean a sequence mean
            self._metrics[mode][trl_name].append(
                global_mean(m[kind.metric], ntok if kind.metric == "clip_frac" else nseq))
        # the Δ metrics are token means where the loss is token-separable (finish_metrics)
        per = ntok if kind.token_separable and self.args.importance_sampling_level == "token" else nseq
        for k in ("delta_mean", "delta_abs_mean", "chi2"):
            self._metrics[mode][f"opo/{k}"].append(global_mean(m[k], per))
        if "kl" in m:
            self._metrics[mode]["kl"].append(global_mean(m["kl"], ntok))
        for k in ("mismatch_k1", "mismatch_k3"):
            if k in m:
                self._metrics[mode][f"opo/{k}"].append(global_mean(m[k], ntok))
        if kind.escort:
            for k in ("omega_min", "omega_max", "omega_std"):
                self._metrics[mode][f"opo/{k}"].append(self.accelerator.gather(m[k].reshape(1)).mean().item())
