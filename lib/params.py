"""Run parameters: YAML profiles validated by pydantic before any heavy work."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PARAMS = ROOT / "params" / "demo.yaml"


class ParamsError(ValueError):
    """Raised when a params file or override is invalid; the message names file and key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunParams(Section):
    name: str = Field("demo", pattern=r"^[A-Za-z0-9._-]+$")
    output_root: str = "outputs"
    seed: int = 42


class EmbeddedData(Section):
    images_per_class: int = Field(120, ge=4)
    seed: int = 0


class DataParams(Section):
    source: Literal["embedded", "hub", "imagefolder"] = "embedded"
    hub_id: str = "Bingsu/Human_Action_Recognition"
    hub_split: str = "train"
    path: str | None = None
    embedded: EmbeddedData = EmbeddedData()
    max_per_class: int | None = Field(None, ge=3)
    dedup: bool = True
    near_duplicate_distance: int | None = Field(
        4,
        ge=0,
        le=16,
        description=(
            "Images whose 64-bit difference hashes (dHash) differ in at most this many bits are joined into one "
            "group, and a group never straddles the train/validation/test split; the images themselves are kept. "
            "4 catches re-encoded, resized, re-watermarked and brightness-shifted copies of a photo (on the HAR "
            "set: 46 non-identical pairs at distance 2, 292 pairs in 180 groups at 4). It errs generous on "
            "purpose: a false match only keeps two unrelated images on the same side, which costs nothing for "
            "leak-freeness, while a missed copy leaks. Larger values risk chaining (A~B~C joins A and C however "
            "far apart), growing groups that make split sizes and stratification coarser. 0 joins only equal "
            "hashes; None turns near-duplicate grouping off (byte-identical copies are still handled by dedup)."
        ),
    )
    val_fraction: float = Field(0.1, gt=0, lt=1)
    test_fraction: float = Field(0.1, gt=0, lt=1)
    seed: int = 42

    @model_validator(mode="after")
    def _check(self) -> DataParams:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(
                f"val_fraction + test_fraction = {self.val_fraction + self.test_fraction:g} "
                "must be < 1 (nothing would be left for training)"
            )
        if self.source == "imagefolder":
            if not self.path:
                raise ValueError("source 'imagefolder' needs data.path")
            if not resolve_path(self.path).is_dir():
                raise ValueError(f"data.path {self.path!r} is not a folder ({resolve_path(self.path)})")
        return self


class VitConfig(Section):
    image_size: int = Field(64, ge=16)
    patch_size: int = Field(8, ge=2)
    hidden_size: int = Field(192, ge=8)
    num_hidden_layers: int = Field(4, ge=1)
    num_attention_heads: int = Field(3, ge=1)
    intermediate_size: int = Field(384, ge=8)

    @model_validator(mode="after")
    def _check(self) -> VitConfig:
        if self.image_size % self.patch_size:
            raise ValueError("image_size must be a multiple of patch_size")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        return self


class ModelParams(Section):
    source: Literal["hub", "local", "config"] = "config"
    name_or_path: str = "google/vit-base-patch16-224"
    config: VitConfig = VitConfig()
    freeze_layers: int = Field(0, ge=0)
    crop_pct: float = Field(0.875, gt=0.3, le=1.0)
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"

    @model_validator(mode="after")
    def _check(self) -> ModelParams:
        if self.source == "local" and not resolve_path(self.name_or_path).is_dir():
            raise ValueError(f"model.name_or_path {self.name_or_path!r} is not a local folder")
        if self.source == "config" and self.freeze_layers > self.config.num_hidden_layers:
            raise ValueError(
                f"freeze_layers={self.freeze_layers} exceeds the {self.config.num_hidden_layers} encoder layers"
            )
        return self


class AugmentParams(Section):
    scale_min: float = Field(0.6, gt=0, le=1)
    hflip: bool = True
    rotation_deg: float = Field(10.0, ge=0, le=45)
    color_jitter: float = Field(0.2, ge=0, le=1)


Reporter = Literal["none", "tensorboard", "wandb", "mlflow"]  # trackers train.report_to accepts


class TrainParams(Section):
    epochs: float = Field(8, gt=0)
    max_steps: int | None = Field(
        None, ge=1, description="stop after this many optimizer steps, whatever epochs says (rehearsals, smoke runs)"
    )
    batch_size: int = Field(32, ge=1)
    grad_accum: int = Field(1, ge=1)
    learning_rate: float = Field(1e-3, gt=0, lt=1)
    weight_decay: float = Field(0.05, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    lr_scheduler: Literal["cosine", "linear", "constant_with_warmup"] = "cosine"
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    layer_decay: float | None = Field(None, gt=0, le=1)
    mixup_alpha: float = Field(0.0, ge=0)
    cutmix_alpha: float = Field(0.0, ge=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    augment: AugmentParams = AugmentParams()
    num_workers: int = Field(0, ge=0)
    resume: bool = False
    save_total_limit: int = Field(2, ge=1)
    num_gpus: int = Field(1, ge=1)
    nodes: int = Field(1, ge=1)
    ddp_backend: Literal["auto", "nccl", "gloo"] = "auto"
    torch_threads: int | None = Field(None, ge=1)
    report_to: list[Reporter] = Field(
        ["tensorboard"],
        description=(
            "Trackers the Trainer logs loss, learning rate and validation metrics to, as TrainingArguments.report_to: "
            "a name or a list of names. tensorboard writes event files into <run>/runs/ (`make tensorboard` shows "
            "every run under outputs/); wandb and mlflow need their own package and settings (WANDB_PROJECT, "
            "MLFLOW_TRACKING_URI, ...); none turns tracking off. Progress lines are printed whatever this says."
        ),
    )

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check(self) -> TrainParams:
        if "none" in self.report_to and len(self.report_to) > 1:
            raise ValueError(f"report_to lists 'none' together with other trackers: {self.report_to}")
        return self


class EvaluateParams(Section):
    batch_size: int = Field(64, ge=1)
    num_workers: int = Field(0, ge=0)
    tta_flip: bool = False
    calibrate: bool = True
    n_mistakes: int = Field(16, ge=0)


class ExportParams(Section):
    enabled: bool = True
    opset: int = Field(18, ge=13)
    quantize: Literal["dynamic", "static", "none"] = "dynamic"
    min_agreement: float = Field(0.99, gt=0, le=1)
    max_accuracy_drop: float = Field(0.005, ge=0, lt=1)


class GateCondition(Section):
    metric: str
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _check(self) -> GateCondition:
        if self.min is None and self.max is None:
            raise ValueError(f"gate condition on {self.metric!r} needs min or max")
        return self


class GateParams(Section):
    enabled: bool = True
    conditions: list[GateCondition] = []

    @model_validator(mode="after")
    def _check(self) -> GateParams:
        if self.enabled and not self.conditions:
            raise ValueError("an enabled gate needs at least one condition (or set enabled: false)")
        return self


class PublishParams(Section):
    enabled: bool = True
    registry: str = "outputs/registry"
    model_name: str = Field("har-vit", pattern=r"^[A-Za-z0-9._-]+$")
    region: str | None = None
    gate: GateParams = GateParams(conditions=[GateCondition(metric="accuracy", min=0.5)])


class DashboardParams(Section):
    registry: str = "outputs/registry"
    model_name: str = Field("har-vit", pattern=r"^[A-Za-z0-9._-]+$")
    version: str = "latest"
    top_k: int = Field(5, ge=1, le=15)
    device: Literal["cpu", "cuda"] = "cpu"
    backend: Literal["auto", "onnx", "torch"] = "auto"
    port: int = Field(8866, ge=1, le=65535)
    max_upload_mib: float = Field(20, gt=0)
    max_pixels: int = Field(40_000_000, ge=1)
    low_confidence: float = Field(0.5, ge=0, le=1)


class Params(Section):
    run: RunParams = RunParams()
    data: DataParams = DataParams()
    model: ModelParams = ModelParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    export: ExportParams = ExportParams()
    publish: PublishParams = PublishParams()
    dashboard: DashboardParams = DashboardParams()


def resolve_path(path: str | Path) -> Path:
    """Resolve a params path: absolute as given, relative to the repository root otherwise."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else ROOT / p


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> leaf value of a nested mapping ({"train": {"epochs": 3}} -> {"train.epochs": 3}); a list,
    such as the gate's conditions, is one leaf."""
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in flatten(sub, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): tree}


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set tree[a][b][c] = value for key 'a.b.c', creating sections as needed."""
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ParamsError(f"override {key!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Split 'train.epochs=2' into ('train.epochs', 2), the value parsed as YAML."""
    if "=" not in text:
        raise ParamsError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ParamsError(f"override {text!r} has an empty key")
    return key, yaml.safe_load(raw) if raw.strip() else None


def _format_error(source: str, err: ValidationError) -> str:
    """One line per problem: file, dotted key, message."""
    lines = [f"invalid params in {source}:"]
    for e in err.errors():
        key = ".".join(str(x) for x in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        elif isinstance(e.get("input"), dict):
            lines.append(f"  {key}: {e['msg']}")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def load_params(path: str | Path = DEFAULT_PARAMS, overrides: list[str] | None = None) -> Params:
    """Read a YAML profile, apply 'key=value' overrides, validate; raise ParamsError naming file and key."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(tree, dict):
        raise ParamsError(f"{path}: top level must be a mapping of sections")
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    source = str(path) + (f" with overrides {overrides}" if overrides else "")
    try:
        return Params.model_validate(tree)
    except ValidationError as exc:
        raise ParamsError(_format_error(source, exc)) from None


def dump_params(params: Params) -> str:
    """Params as YAML, every default spelled out."""
    return yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False)


def save_params(params: Params, path: str | Path) -> Path:
    """Write the resolved params to path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_params(params))
    return path


def run_dir(params: Params) -> Path:
    """The run's output folder: <output_root>/<run.name>."""
    return resolve_path(params.run.output_root) / params.run.name


def main(argv: list[str] | None = None) -> int:
    """Validate a params file: python -m lib.params FILE [key=value ...]."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        print(dump_params(load_params(argv[0] if argv else DEFAULT_PARAMS, argv[1:])))
    except ParamsError as exc:
        print(exc, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
