"""The publish gate: conditions on the served model's own metrics (metrics.json["served"]), with a report of each.

What is served is one file (an int8 or student ONNX file, or the fp32 export) run on one view. Its test figures are
in metrics.json["served"], written by the export stage. The top-level figures of metrics.json describe the trained
PyTorch model as evaluated, with flip averaging when evaluate.tta_flip is on: a model nobody is served. The gate
therefore reads every condition's key inside the served block ("accuracy" is the served file's accuracy; dotted keys
reach nested values; a leading "served." is accepted and means the same).
"""

from __future__ import annotations

from typing import Any

from lib.params import GateCondition

SERVED = "served"

SERVED_WHERE = 'metrics.json["served"]'


def metric_value(metrics: dict, key: str) -> Any:
    """Look up a dotted metric key ('per_class.sitting.f1'); keys that themselves hold dots are matched too."""
    if key in metrics:
        return metrics[key]
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:i])
        if head in metrics and isinstance(metrics[head], dict):
            return metric_value(metrics[head], ".".join(parts[i:]))
    raise KeyError(key)


def served_metrics(metrics: dict) -> dict | None:
    """The served file's own metrics (metrics.json["served"]), None when the run has none (not exported)."""
    served = metrics.get(SERVED)
    return served if isinstance(served, dict) else None


def judged(metrics: dict) -> dict:
    """What the gate judges, for the publish record and the model card: the served file, its variant and backend,
    one view, the test split."""
    served = served_metrics(metrics) or {}
    return {
        "metrics": SERVED_WHERE,
        "file": served.get("file"),
        "variant": served.get("variant"),
        "backend": served.get("backend"),
        "views": 1,
        "split": served.get("reported_on", "test"),
    }


def _served_key(metric: str) -> str:
    """The key inside the served block: a condition may spell it 'served.accuracy' or 'accuracy'."""
    prefix = f"{SERVED}."
    return metric[len(prefix) :] if metric.startswith(prefix) else metric


def _gate_failure(cond: GateCondition, served: dict | None) -> tuple[Any, str]:
    """(value, failure message or '') for one condition, judged on the served block."""
    bounds = " and ".join(f"{n} {v:g}" for n, v in (("min", cond.min), ("max", cond.max)) if v is not None)
    if served is None:
        return None, (
            f"{cond.metric}: metrics.json has no {SERVED!r} block, the served model's own figures "
            f"(run the export stage; gate needs {bounds})"
        )
    try:
        value = metric_value(served, _served_key(cond.metric))
    except KeyError:
        numbers = (k for k, v in served.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
        have = ", ".join(sorted(numbers))
        return None, f"{cond.metric}: missing from {SERVED_WHERE} (it has {have or 'no numbers'}; gate needs {bounds})"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value, f"{cond.metric}: not a number (got {value!r}; gate needs {bounds})"
    if value != value:  # NaN passes no comparison
        return value, f"{cond.metric}: is NaN (gate needs {bounds})"
    if cond.min is not None and value < cond.min:
        return value, f"{cond.metric} = {value:.4f} is below min {cond.min:.4f} by {cond.min - value:.4f}"
    if cond.max is not None and value > cond.max:
        return value, f"{cond.metric} = {value:.4f} is above max {cond.max:.4f} by {value - cond.max:.4f}"
    return value, ""


def gate_report(metrics: dict, conditions: list[GateCondition]) -> list[dict]:
    """One row per condition, judged on metrics.json["served"]: metric, key (where the value was read), value, min,
    max, passed, and the failure message (empty when passed). metrics is the whole metrics.json."""
    served = served_metrics(metrics)
    rows = []
    for cond in conditions:
        value, failure = _gate_failure(cond, served)
        rows.append(
            {
                "metric": cond.metric,
                "key": f"{SERVED}.{_served_key(cond.metric)}",
                "value": value,
                "min": cond.min,
                "max": cond.max,
                "passed": not failure,
                "failure": failure,
            }
        )
    return rows


def check_gate(metrics: dict, conditions: list[GateCondition]) -> list[str]:
    """Failed conditions on the served model's metrics, each naming the metric, the threshold and the miss."""
    return [row["failure"] for row in gate_report(metrics, conditions) if row["failure"]]
