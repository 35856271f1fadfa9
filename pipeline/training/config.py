"""The ``train`` config section as typed settings (defaults from the schema alone)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline import settings

_DEFAULTS = settings.defaults("train")


@dataclass(frozen=True)
class TrainConfig:
    """The ``train`` config section; the values and their meaning are in the schema
    (``workflow/schemas/config.schema.yaml``, the only copy of the defaults)."""

    max_steps: int = _DEFAULTS["max_steps"]
    batch_size: int = _DEFAULTS["batch_size"]
    gradient_accumulation_steps: int = _DEFAULTS["gradient_accumulation_steps"]
    learning_rate: float = _DEFAULTS["learning_rate"]
    lr_warmup_steps: int = _DEFAULTS["lr_warmup_steps"]
    adam_beta1: float = _DEFAULTS["adam_beta1"]
    adam_beta2: float = _DEFAULTS["adam_beta2"]
    adam_epsilon: float = _DEFAULTS["adam_epsilon"]
    weight_decay: float = _DEFAULTS["weight_decay"]
    max_grad_norm: float = _DEFAULTS["max_grad_norm"]
    beta: float = _DEFAULTS["beta"]
    k: float = _DEFAULTS["k"]
    dro_margin: float = _DEFAULTS["dro_margin"]
    # ddpo (pipeline.training.ddpo, docs/online_alignment.md)
    policy_steps: int = _DEFAULTS["policy_steps"]
    policy_eta: float = _DEFAULTS["policy_eta"]
    policy_cfg: float | None = _DEFAULTS["policy_cfg"]
    policy_group_size: int = _DEFAULTS["policy_group_size"]
    onestep_policy_std: float = _DEFAULTS["onestep_policy_std"]
    ppo_clip_range: float = _DEFAULTS["ppo_clip_range"]
    ppo_adv_clip_max: float = _DEFAULTS["ppo_adv_clip_max"]
    ppo_inner_epochs: int = _DEFAULTS["ppo_inner_epochs"]
    ppo_timestep_fraction: float = _DEFAULTS["ppo_timestep_fraction"]
    stat_tracker_buffer_size: int = _DEFAULTS["stat_tracker_buffer_size"]
    stat_tracker_min_count: int = _DEFAULTS["stat_tracker_min_count"]
    # dro_online (pipeline.training.dro_online, docs/online_alignment.md "Online DRO")
    dro_positives: str = _DEFAULTS["dro_positives"]
    dro_buffer_size: int = _DEFAULTS["dro_buffer_size"]
    dro_refill_every: int = _DEFAULTS["dro_refill_every"]
    dro_sync_every: int | None = _DEFAULTS["dro_sync_every"]
    dro_sampler_steps: int = _DEFAULTS["dro_sampler_steps"]
    dro_sampler_cfg: float = _DEFAULTS["dro_sampler_cfg"]
    dro_sampler_eta: float = _DEFAULTS["dro_sampler_eta"]
    dro_sampler_batch_size: int = _DEFAULTS["dro_sampler_batch_size"]
    dro_refill_batches: int = _DEFAULTS["dro_refill_batches"]
    dro_perturb_timesteps: bool = _DEFAULTS["dro_perturb_timesteps"]
    # gdpo, gdpo_instance (pipeline.training.gdpo, docs/online_alignment.md "GDPO")
    gdpo_beta: float = _DEFAULTS["gdpo_beta"]
    gdpo_fidelity_weight: float | None = _DEFAULTS["gdpo_fidelity_weight"]
    gdpo_detail_weight: float | None = _DEFAULTS["gdpo_detail_weight"]
    gdpo_fidelity_metrics: list[str] = field(
        default_factory=lambda: list(_DEFAULTS["gdpo_fidelity_metrics"])
    )
    gdpo_detail_metrics: list[str] = field(
        default_factory=lambda: list(_DEFAULTS["gdpo_detail_metrics"])
    )
    negative_prompts: bool = _DEFAULTS["negative_prompts"]
    uncond_drop_rate: float = _DEFAULTS["uncond_drop_rate"]
    checkpoint_every: int = _DEFAULTS["checkpoint_every"]
    keep_checkpoints: int = _DEFAULTS["keep_checkpoints"]
    mixed_precision: str = _DEFAULTS["mixed_precision"]
    gradient_checkpointing: bool = _DEFAULTS["gradient_checkpointing"]
    heldout_fraction: float = _DEFAULTS["heldout_fraction"]
    eval_every: int = _DEFAULTS["eval_every"]
    curve_items: int = _DEFAULTS["curve_items"]
    memory: str = _DEFAULTS["memory"]
    device: str = _DEFAULTS["device"]

    def __post_init__(self) -> None:
        # the schema checks these too; a TrainConfig built in code is checked here
        for key in (
            "max_steps",
            "batch_size",
            "gradient_accumulation_steps",
            "checkpoint_every",
            "eval_every",
            "curve_items",
        ):
            if getattr(self, key) < 1:
                raise ValueError(f"train.{key} must be >= 1, got {getattr(self, key)}")

    @classmethod
    def from_dict(cls, section: dict[str, Any] | None) -> TrainConfig:
        """The section with the schema's defaults; bad keys, types or ranges raise
        :class:`pipeline.settings.ConfigError` naming them."""
        return cls(**settings.resolve("train", section))
