"""Run parameters: YAML profiles validated by pydantic before any heavy work."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PARAMS = ROOT / "params" / "demo.yaml"


class ParamsError(ValueError):
    """Raised when a params file or override is invalid; the message names file and key."""


class Section(BaseModel):
    """A params section: unknown keys are errors, and assignments are validated too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunParams(Section):
    """run: the run's name, where its folder goes, its seed."""

    name: str = Field(
        "demo",
        pattern=r"^[A-Za-z0-9._-]+$",
        description="Name of the run folder (<output_root>/<name>) and of the run in trackers.",
    )
    output_root: str = Field("outputs", description="Folder holding the run folders; relative to the repository root.")
    seed: int = Field(42, description="Seed of training (initial weights, shuffling, augmentation) and of samples.png.")


class EmbeddedData(Section):
    """data.embedded: the built-in stick-figure generator."""

    images_per_class: int = Field(
        120, ge=4, description="Images generated per class, about 1 % of them planted exact copies that dedup drops."
    )
    seed: int = Field(0, description="Generator seed: the same seed draws byte-identical images.")


# Largest dHash distance at which near-duplicate candidates may join unconfirmed: on real photos the hash alone starts
# matching unrelated images (plain studio backgrounds, letterboxed video frames) at 7 bits.
HASH_ONLY_MAX_DISTANCE = 6


class DataParams(Section):
    """data: where the images come from, de-duplication and the train / validation / test split."""

    source: Literal["embedded", "hub", "imagefolder"] = Field(
        "embedded",
        description=(
            "embedded: the built-in generator (offline demo); hub: a Hugging Face dataset (hub_id); imagefolder: a "
            "local folder with one subfolder per class (path)."
        ),
    )
    hub_id: str = Field("Bingsu/Human_Action_Recognition", description="Hugging Face dataset id, for source hub.")
    hub_split: str = Field(
        "train",
        description="Split of the Hub dataset to load; validation and test are carved out of it (HAR's test split "
        "has no labels).",
    )
    path: str | None = Field(
        None,
        description="Image folder for source imagefolder, one subfolder per class; relative to the repository root.",
    )
    embedded: EmbeddedData = Field(EmbeddedData(), description="The built-in generator, for source embedded.")
    max_per_class: int | None = Field(
        None,
        ge=3,
        description="Keep at most this many random images per class, after dedup (quick runs); null keeps all.",
    )
    dedup: bool = Field(
        True, description="Drop byte-identical files (same SHA-256) before splitting, keeping the first."
    )
    near_duplicate_distance: int | None = Field(
        12,
        ge=0,
        le=16,
        description=(
            "Candidate near-duplicates: images whose 64-bit difference hashes (dHash) differ in at most this many "
            "bits. Each candidate pair confirmed by near_duplicate_min_similarity is joined into one group, "
            "transitively, and a group never straddles the train/validation/test split; the images themselves are "
            "kept. Copies of a photo re-encoded, resized, re-cropped or re-watermarked, and frames of the same shoot, "
            "can sit up to about 12 bits apart. Above 6 bits the hash alone also matches unrelated photos (plain "
            "studio backgrounds, letterboxed frames), so a larger distance needs a confirmation threshold. 0 joins "
            "only equal hashes; null turns near-duplicate grouping off (byte-identical copies are still handled by "
            "dedup)."
        ),
    )
    near_duplicate_min_similarity: float | None = Field(
        0.8,
        gt=0,
        le=1,
        description=(
            "Confirmation of a candidate pair: the Pearson correlation of the two images' 32x32 grey thumbnails "
            "must reach at least this (1: identical up to brightness and contrast). Re-encoded and resized copies "
            "score near 1, re-crops and other frames of a shoot lower; unrelated photos that share a hash "
            "neighbourhood (a figure on a plain background) stay below it. Lower values catch more re-crops and "
            "join more unrelated photos. null: no confirmation, every candidate joins (allowed up to 6 bits only)."
        ),
    )
    val_fraction: float = Field(
        0.1, gt=0, lt=1, description="Share of the images held out for validation: best epoch, temperature scaling."
    )
    test_fraction: float = Field(
        0.1, gt=0, lt=1, description="Share held out for the test split, on which every reported metric is measured."
    )
    seed: int = Field(42, description="Seed of the per-class cap and of the split.")

    @model_validator(mode="after")
    def _check(self) -> DataParams:
        distance = self.near_duplicate_distance
        if distance is not None and distance > HASH_ONLY_MAX_DISTANCE and self.near_duplicate_min_similarity is None:
            raise ValueError(
                f"near_duplicate_distance={distance} without near_duplicate_min_similarity: the hash alone above "
                f"{HASH_ONLY_MAX_DISTANCE} bits joins unrelated photos (plain backgrounds, letterboxed frames); set a "
                f"confirmation threshold (e.g. 0.8) or a distance of at most {HASH_ONLY_MAX_DISTANCE}"
            )
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
    """model.config: the ViT built from scratch (model.source config)."""

    image_size: int = Field(64, ge=16, description="Input side in pixels; 64 keeps the demo fast on a CPU.")
    patch_size: int = Field(
        8,
        ge=2,
        description="Patch side in pixels; image_size is a multiple, giving (image_size / patch_size)^2 tokens.",
    )
    hidden_size: int = Field(
        192, ge=8, description="Token width, a multiple of num_attention_heads (192 and 3 heads: ViT-Tiny's width)."
    )
    num_hidden_layers: int = Field(4, ge=1, description="Encoder layers (transformer blocks).")
    num_attention_heads: int = Field(3, ge=1, description="Attention heads per layer.")
    intermediate_size: int = Field(384, ge=8, description="Hidden width of each block's MLP.")

    @model_validator(mode="after")
    def _check(self) -> VitConfig:
        if self.image_size % self.patch_size:
            raise ValueError("image_size must be a multiple of patch_size")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        return self


class ModelParams(Section):
    """model: the backbone, how it is built, frozen layers, the evaluation crop."""

    source: Literal["hub", "local", "config"] = Field(
        "config",
        description="hub: download name_or_path from the Hugging Face Hub; local: load that folder; config: build the "
        "ViT in config from scratch (offline demo).",
    )
    name_or_path: str = Field(
        "google/vit-base-patch16-224",
        description="Any AutoModelForImageClassification Hub id or local folder; its head is replaced by one for the "
        "15 actions.",
    )
    config: VitConfig = Field(VitConfig(), description="Size of the ViT built from scratch, for source config.")
    freeze_layers: int = Field(
        0, ge=0, description="Freeze the patch embeddings and the first N encoder layers; 0 trains everything."
    )
    crop_pct: float | None = Field(
        None,
        gt=0.3,
        le=1.0,
        description="Evaluation resize. null: as the backbone's own image processor does it (ViT, BEiT, Swin, SigLIP "
        "squash to size x size; DeiT squashes to 256 and crops 224; DINOv2 and ConvNeXt resize the shorter side and "
        "crop); a model built from a config then squashes. A number overrides it: shorter side to size / crop_pct, "
        "center-crop size (0.875: 224 of 256).",
    )
    attn_implementation: Literal["sdpa", "eager"] = Field(
        "sdpa",
        description="Attention kernel for training and PyTorch inference: sdpa (fused) or eager; the ONNX export "
        "always uses eager.",
    )

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
    """train.augment: random augmentation of training images only."""

    scale_min: float = Field(
        0.6, gt=0, le=1, description="Random resized crop: keep between this share and all of the image's area."
    )
    hflip: bool = Field(True, description="Mirror half the images left-right (no action here depends on handedness).")
    rotation_deg: float = Field(10.0, ge=0, le=45, description="Rotate by a random angle within ± this many degrees.")
    color_jitter: float = Field(
        0.2, ge=0, le=1, description="Scale brightness, contrast and saturation by random factors within 1 ± this."
    )


Reporter = Literal["none", "tensorboard", "wandb", "mlflow"]  # trackers train.report_to accepts


class TrainParams(Section):
    """train: the fine-tuning recipe run by the Hugging Face Trainer."""

    epochs: float = Field(8, gt=0, description="Passes over the training split; a fraction stops inside the last one.")
    max_steps: int | None = Field(
        None, ge=1, description="Stop after this many optimizer steps, whatever epochs says (rehearsals, smoke runs)."
    )
    batch_size: int = Field(
        32,
        ge=1,
        description="Training images per process and micro-batch; the global batch is this x grad_accum x processes.",
    )
    grad_accum: int = Field(1, ge=1, description="Micro-batches whose gradients are summed into one optimizer step.")
    learning_rate: float = Field(
        1e-3,
        gt=0,
        lt=1,
        description="Peak AdamW learning rate, reached after warmup (1e-3 suits a small ViT from scratch; fine-tuning "
        "a pretrained one wants about 1e-4).",
    )
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay; biases and norm weights get none.")
    warmup_ratio: float = Field(
        0.1, ge=0, lt=1, description="Share of all optimizer steps over which the learning rate rises from 0."
    )
    lr_scheduler: Literal["cosine", "linear", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate decay after warmup."
    )
    label_smoothing: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="Probability mass of each target spread evenly over all classes; curbs overconfident fits.",
    )
    layer_decay: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Layer-wise decay: the encoder layer d below the top learns at lr x layer_decay^d, so "
        "pretrained lower layers move less; null: one rate.",
    )
    mixup_alpha: float = Field(
        0.0, ge=0, description="Mixup of training batches, weight drawn from Beta(alpha, alpha); 0 turns it off."
    )
    cutmix_alpha: float = Field(
        0.0,
        ge=0,
        description="CutMix of training batches, pasted area from Beta(alpha, alpha); 0 turns it off (with mixup on "
        "too, each batch gets one of the two).",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="auto: bf16 on a GPU that has it, fp16 on older GPUs, fp32 on the CPU; bf16 and fp16 need CUDA.",
    )
    augment: AugmentParams = Field(
        AugmentParams(), description="Random augmentation of the training split; evaluation images are never augmented."
    )
    num_workers: int = Field(
        0, ge=0, description="DataLoader processes decoding and augmenting images; 0 works in the training process."
    )
    resume: bool = Field(False, description="Continue from the last checkpoint in <run>/checkpoints/.")
    save_total_limit: int = Field(
        2, ge=1, description="Epoch checkpoints kept in <run>/checkpoints/; the best one is always among them."
    )
    num_gpus: int = Field(
        1, ge=1, description="Training processes per machine; more than one process in all launches torchrun (DDP)."
    )
    nodes: int = Field(1, ge=1, description="Machines taking part in DDP training (README: several machines).")
    ddp_backend: Literal["auto", "nccl", "gloo"] = Field(
        "auto", description="DDP communication backend; auto: nccl on GPUs, gloo on the CPU."
    )
    torch_threads: int | None = Field(
        None, ge=1, description="CPU threads PyTorch trains with; null: PyTorch's default (every core)."
    )
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
    """evaluate: test-split inference, the mistakes shown, temperature scaling."""

    batch_size: int = Field(64, ge=1, description="Images per inference batch (the export stage's checks use it too).")
    num_workers: int = Field(0, ge=0, description="DataLoader processes decoding images; 0 works in the notebook.")
    tta_flip: bool = Field(
        False,
        description="Report metrics on the average of each image's and its mirror's logits; serving runs one view.",
    )
    calibrate: bool = Field(
        True, description="Fit a temperature on the validation split (evaluated and served model); false keeps T = 1."
    )
    n_mistakes: int = Field(16, ge=0, description="Most confident test mistakes shown in mistakes.png.")


class ExportParams(Section):
    """export: ONNX files, int8 quantization and the rule choosing the served file (on the validation split)."""

    enabled: bool = Field(True, description="Run the export stage; without it the dashboard serves the PyTorch model.")
    opset: int = Field(18, ge=13, description="ONNX operator set version the exported files use.")
    quantize: Literal["dynamic", "static", "none"] = Field(
        "dynamic",
        description="int8 file: dynamic (int8 weights, activation ranges per batch, no calibration data), static "
        "(ranges from 64 validation images), none (fp32 only).",
    )
    min_agreement: float = Field(
        0.99,
        gt=0,
        le=1,
        description="Share of validation images on which a file's top-1 class must equal PyTorch's: int8 to be "
        "served, the fp32 files to be kept at all (the test split takes no part in the choice).",
    )
    max_accuracy_drop: float = Field(
        0.005,
        ge=0,
        lt=1,
        description="Validation accuracy a variant (int8, a student) may lose against the trained PyTorch model and "
        "still be served (absolute, 0.005: half a point); the teacher's fp32 ONNX is served when none passes. The "
        "chosen file's test figures are measured afterwards and reported as served.",
    )
    student_layers: int | None = Field(
        None,
        ge=1,
        description="Encoder blocks of a smaller student cut from the trained model (evenly spread, first and last "
        "kept) and distilled from it, then exported and offered to the serving gate; null: no student.",
    )
    distill_epochs: float = Field(
        10, gt=0, description="Passes over the training split distilling the student (train's recipe otherwise)."
    )
    distill_max_steps: int | None = Field(
        None,
        ge=1,
        description="Stop distilling after this many optimizer steps, whatever distill_epochs says "
        "(rehearsals, smoke runs).",
    )
    distill_temperature: float = Field(
        2.0,
        gt=0,
        description="Temperature of both softmaxes in the distillation loss; above 1 the student also learns the "
        "teacher's ranking of the wrong classes.",
    )
    distill_alpha: float = Field(
        0.9,
        ge=0,
        le=1,
        description="Weight of the distillation term (KL to the teacher at the temperature, times its square); the "
        "rest goes to cross-entropy with the training labels.",
    )
    min_student_agreement: float = Field(
        0.95,
        gt=0,
        le=1,
        description="Share of validation images on which a student's top-1 class must equal the trained model's for "
        "the student to be served (with max_accuracy_drop).",
    )


class GateCondition(Section):
    """One condition of the quality gate: a metric and its bounds."""

    metric: str = Field(
        description="A metrics.json key; dots reach nested values, e.g. per_class.sitting.f1 or served.ece."
    )
    min: float | None = Field(None, description="Lowest value that passes (inclusive); null: no lower bound.")
    max: float | None = Field(None, description="Highest value that passes (inclusive); null: no upper bound.")

    @model_validator(mode="after")
    def _check(self) -> GateCondition:
        if self.min is None and self.max is None:
            raise ValueError(f"gate condition on {self.metric!r} needs min or max")
        return self


class GateParams(Section):
    """publish.gate: conditions on the run's metrics.json that must all hold before anything is uploaded."""

    enabled: bool = Field(True, description="Check the conditions before uploading; false publishes every run.")
    conditions: list[GateCondition] = Field(
        [], description="Conditions that must all hold; an enabled gate needs at least one."
    )

    @model_validator(mode="after")
    def _check(self) -> GateParams:
        if self.enabled and not self.conditions:
            raise ValueError("an enabled gate needs at least one condition (or set enabled: false)")
        return self


class PublishParams(Section):
    """publish: the registry, the model's name in it, the quality gate."""

    enabled: bool = Field(True, description="Run the publish stage.")
    registry: str = Field(
        "outputs/registry",
        description="Where versions are uploaded: s3://bucket/prefix or a folder; S3 credentials come from boto3's "
        "chain, never from params.",
    )
    model_name: str = Field(
        "har-vit", pattern=r"^[A-Za-z0-9._-]+$", description="Model name in the registry: <registry>/<model_name>/."
    )
    region: str | None = Field(None, description="AWS region of an S3 registry; null: boto3's default.")
    gate: GateParams = Field(
        GateParams(conditions=[GateCondition(metric="accuracy", min=0.5)]),
        description="Quality gate on metrics.json; a run that fails it uploads nothing.",
    )


class DashboardParams(Section):
    """dashboard: which published model the Voila page serves, and its limits; HAR_* variables override each key."""

    registry: str = Field(
        "outputs/registry", description="Registry the model is pulled from: s3://bucket/prefix or a folder."
    )
    model_name: str = Field("har-vit", pattern=r"^[A-Za-z0-9._-]+$", description="Model name in that registry.")
    version: str = Field("latest", description="Version to serve; latest: the one the registry's latest.json names.")
    top_k: int = Field(5, ge=1, le=15, description="Classes shown per photo, most probable first.")
    device: Literal["cpu", "cuda"] = Field(
        "cpu", description="Device of the PyTorch backend; the ONNX backend runs on the CPU only."
    )
    backend: Literal["auto", "onnx", "torch"] = Field(
        "auto",
        description="auto: the exported ONNX file when the version has one and the device is the CPU, else PyTorch.",
    )
    port: int = Field(
        8866,
        ge=1,
        le=65535,
        description="HTTP port of the page (8866: Voila's default); voila takes it on its command line, deploy/ "
        "from HAR_PORT.",
    )
    max_upload_mib: float = Field(
        20,
        gt=0,
        description="Largest photo accepted, upload or URL, in MiB (the Voila server caps a websocket message at "
        "this + 2 MiB).",
    )
    max_pixels: int = Field(
        40_000_000, ge=1, description="Largest image accepted, in pixels: refuses decompression bombs before decoding."
    )
    low_confidence: float = Field(
        0.5, ge=0, le=1, description="Show a low-confidence notice when the top class's probability is below this."
    )


class Params(Section):
    """Every section of a params profile, one per stage plus the dashboard."""

    run: RunParams = Field(RunParams(), description="The run: its name, output folder and seed.")
    data: DataParams = Field(DataParams(), description="Prepare stage: the images, de-duplication, the split.")
    model: ModelParams = Field(ModelParams(), description="Train stage: the backbone and how it is built.")
    train: TrainParams = Field(TrainParams(), description="Train stage: the fine-tuning recipe.")
    evaluate: EvaluateParams = Field(EvaluateParams(), description="Evaluate stage: test metrics and calibration.")
    export: ExportParams = Field(ExportParams(), description="Export stage: ONNX, int8 and the served file.")
    publish: PublishParams = Field(PublishParams(), description="Publish stage: the gate and the registry upload.")
    dashboard: DashboardParams = Field(
        DashboardParams(), description="The Voila page serving a published model; HAR_* variables override each key."
    )


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


def _section_class(annotation: Any) -> type[Section] | None:
    """The section a field holds (data.embedded, train.augment, publish.gate), else None."""
    return annotation if isinstance(annotation, type) and issubclass(annotation, Section) else None


def _item_class(annotation: Any) -> type[Section] | None:
    """The section each item of a list field is (publish.gate.conditions), else None."""
    args = get_args(annotation)
    return _section_class(args[0]) if get_origin(annotation) is list and args else None


def _show(value: Any) -> str:
    """A value as JSON, which a YAML profile and --set both accept."""
    return json.dumps(value, ensure_ascii=False)


def _wrapped(text: str | None, indent: str = "    ") -> list[str]:
    """A description as indented lines of at most 100 characters."""
    return textwrap.wrap(text or "", width=100, initial_indent=indent, subsequent_indent=indent)


def _explain(cls: type[Section], values: dict, defaults: dict, prefix: str, lines: list[str]) -> None:
    """Append a section's keys to lines; its own keys first, so that a nested section's heading ends its block."""
    fields = cls.model_fields.items()
    for name, field in [(n, f) for n, f in fields if not _section_class(f.annotation)]:
        key = prefix + name
        lines.append(f"{key} = {_show(values[name])}  (default: {_show(defaults[name])})")
        lines += _wrapped(field.description)
        item = _item_class(field.annotation)
        for sub, sub_field in (item.model_fields if item else {}).items():
            default = "required" if sub_field.is_required() else f"default: {_show(sub_field.default)}"
            lines.append(f"{key}[].{sub}  (each item; {default})")
            lines += _wrapped(sub_field.description)
    for name, field in fields:
        section = _section_class(field.annotation)
        if section is not None:
            lines += ["", f"[{prefix}{name}] {field.description}"]
            _explain(section, values[name], defaults[name], f"{prefix}{name}.", lines)


def explain(params: Params) -> str:
    """Every key, section by section: its resolved value, its default and its description; nested keys dotted."""
    lines = ["# key = resolved value  (default: its value in an empty profile)"]
    values, defaults = params.model_dump(mode="json"), Params().model_dump(mode="json")
    for name, field in Params.model_fields.items():
        lines += ["", f"[{name}] {field.description}"]
        _explain(field.annotation, values[name], defaults[name], f"{name}.", lines)
    return "\n".join(lines)


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
