"""Deterministic "embedded dataset": stick-figure images of the 15 action classes, written as an ImageFolder.

Every image is drawn from its own numpy Generator seeded with (seed, class index, sample index), so the
output is byte-for-byte the same for a given seed whatever order the images are generated in.

Geometry is done with complex numbers: a point is x + 1j*y in image orientation (y grows downwards), so a
rotation is a multiplication by exp(1j*angle). Scenes are drawn in "figure units" (a standing person is
about 1 unit tall, facing right) and then scaled, rotated, mirrored and placed near the image centre.
"""

from __future__ import annotations

import cmath
import colorsys
import json
import math
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from lib.labels import HAR_CLASSES as CLASS_NAMES  # the generator draws one scene type per dataset class

GENERATOR_VERSION = 2
MANIFEST = "_generated.json"
DUPLICATE_FRACTION = 0.01
PNG_FRACTION = 0.15
# How hard the task is. Pose and props carry the label; context and framing are partial, realistic hints.
CONTEXT_FRACTION = 0.9  # share of images whose background is the action's usual setting (else any setting)
MAX_ROTATION_DEG = 5.0
SCALE_RANGE = (0.82, 0.95)  # longest side of the framed scene, as a fraction of the evaluation crop
MAX_SHIFT = 0.08  # largest offset of the scene centre from the image centre, as a fraction of the crop
MAX_CLUTTER = 3
MAX_NOISE_STD = 6.0
BLUR_FRACTION = 0.2

# A shape is one of:
#   ("line", [points], width, colour_key)        polyline with rounded joints; width in figure units
#   ("disc", centre, radius, colour_key, outline_key)
#   ("poly", [points], colour_key, outline_key or None)
Shape = tuple
Palette = dict[str, tuple[int, int, int]]


# --------------------------------------------------------------------------------------------- geometry


def _dir(deg: float) -> complex:
    """Unit vector at `deg` degrees: 0 points down, 90 right, 180 up, -90 left."""
    rad = math.radians(deg)
    return complex(math.sin(rad), math.cos(rad))


def _limb(start: complex, deg1: float, deg2: float, len1: float, len2: float) -> list[complex]:
    """Two-segment limb from absolute segment directions: [start, middle joint, end]."""
    mid = start + len1 * _dir(deg1)
    return [start, mid, mid + len2 * _dir(deg2)]


def _reach(start: complex, target: complex, len1: float, len2: float, bend: int) -> list[complex]:
    """Two-segment limb whose end reaches `target` (as far as it can); bend=+1/-1 picks the elbow side."""
    d = target - start
    dist = min(max(abs(d), abs(len1 - len2) + 1e-3), len1 + len2 - 1e-3)
    cos_a = (len1 * len1 + dist * dist - len2 * len2) / (2 * len1 * dist)
    u = d / abs(d) if abs(d) > 1e-9 else -1j
    mid = start + len1 * u * cmath.exp(1j * bend * math.acos(max(-1.0, min(1.0, cos_a))))
    v = target - mid
    return [start, mid, mid + len2 * (v / abs(v) if abs(v) > 1e-9 else u)]


def _rect(centre: complex, w: float, h: float, deg: float = 0.0) -> list[complex]:
    """Corners of a w x h rectangle rotated clockwise by `deg` degrees."""
    r = cmath.exp(1j * math.radians(deg))
    return [centre + r * complex(x, y) for x, y in ((-w / 2, -h / 2), (w / 2, -h / 2), (w / 2, h / 2), (-w / 2, h / 2))]


def _arc(centre: complex, rx: float, ry: float, deg0: float, deg1: float, n: int = 12) -> list[complex]:
    """Points on an ellipse arc, angles in degrees measured clockwise from +x."""
    return [centre + complex(rx * math.cos(t), ry * math.sin(t)) for t in np.radians(np.linspace(deg0, deg1, n))]


# --------------------------------------------------------------------------------------------- people


def _proportions(rng: np.random.Generator) -> dict[str, float]:
    """Segment lengths in figure units, each jittered by a few percent."""
    base = {"torso": 0.32, "head": 0.1, "upper_arm": 0.17, "forearm": 0.16, "thigh": 0.23, "shin": 0.22}
    return {k: v * float(rng.uniform(0.92, 1.08)) for k, v in base.items()}


def _body(p: dict[str, float], hip: complex, lean: float, head_pitch: float) -> dict[str, complex]:
    """Hip, shoulder, neck, head centre and head axes for a torso leaning `lean` degrees forward (to +x)."""
    up = _dir(180 - lean)
    neck = hip + p["torso"] * up
    head_up = _dir(180 - lean - head_pitch)
    return {
        "hip": hip,
        "neck": neck,
        "shoulder": hip + 0.88 * p["torso"] * up,
        "head": neck + 1.15 * p["head"] * head_up,
        "head_up": head_up,
        "forward": head_up * 1j,
    }


def _mouth_point(p: dict[str, float], b: dict[str, complex]) -> complex:
    """Where the mouth is: front of the head, a little below its centre."""
    return b["head"] + 0.9 * p["head"] * b["forward"] - 0.35 * p["head"] * b["head_up"]


def _person(p: dict[str, float], body: dict[str, complex], limbs: list[list[complex]], key: str = "fig") -> list[Shape]:
    """Shapes of one stick figure: torso, four limbs and a head disc."""
    shapes: list[Shape] = [("line", [body["hip"], body["neck"]], 1.0, key)]
    shapes += [("line", limb, 1.0, key) for limb in limbs]
    shapes.append(("disc", body["head"], p["head"], "head" if key == "fig" else key, key))
    return shapes


def _arms_down(rng: np.random.Generator, p: dict[str, float], shoulder: complex) -> list[list[complex]]:
    """Two relaxed arms hanging slightly away from the body."""
    a, b = float(rng.uniform(8, 30)), float(rng.uniform(8, 30))
    return [
        _limb(shoulder, a, a + rng.normal(0, 8), p["upper_arm"], p["forearm"]),
        _limb(shoulder, -b, -b + rng.normal(0, 8), p["upper_arm"], p["forearm"]),
    ]


def _legs_standing(rng: np.random.Generator, p: dict[str, float], hip: complex) -> list[list[complex]]:
    """Two straight-ish legs slightly apart."""
    a, b = float(rng.uniform(5, 16)), float(rng.uniform(5, 16))
    return [
        _limb(hip, a, a + rng.normal(0, 4), p["thigh"], p["shin"]),
        _limb(hip, -b, -b + rng.normal(0, 4), p["thigh"], p["shin"]),
    ]


def _legs_seated(rng: np.random.Generator, p: dict[str, float], hip: complex) -> list[list[complex]]:
    """Thighs forward, shins down: the legs of someone on a chair."""
    return [_limb(hip, rng.uniform(78, 100), rng.uniform(-5, 20), p["thigh"], p["shin"]) for _ in range(2)]


# --------------------------------------------------------------------------------------------- props


def _chair(p: dict[str, float], hip: complex, rng: np.random.Generator) -> list[Shape]:
    """A side-view chair under a seated hip: seat, backrest and two legs."""
    seat_y = hip.imag + 0.04
    back_x = hip.real - 0.07
    front_x = hip.real + p["thigh"] * 0.9
    floor = seat_y + p["shin"] * float(rng.uniform(0.95, 1.1))
    top = seat_y - float(rng.uniform(0.25, 0.35))
    return [
        ("line", [complex(back_x, top), complex(back_x, floor)], 0.9, "wood"),
        ("line", [complex(back_x, seat_y), complex(front_x, seat_y)], 0.9, "wood"),
        ("line", [complex(front_x, seat_y), complex(front_x, floor)], 0.9, "wood"),
    ]


def _table(p: dict[str, float], x0: float, x1: float, top: float) -> list[Shape]:
    """A side-view table top from x0 to x1 at height `top`, with one leg near the far end."""
    leg = x1 - 0.06
    return [
        ("line", [complex(x0, top), complex(x1, top)], 1.0, "wood"),
        ("line", [complex(leg, top), complex(leg, top + p["shin"] + 0.06)], 0.8, "wood"),
    ]


def _phone(centre: complex, deg: float, screen: bool) -> list[Shape]:
    """A dark phone; with `screen`, its lit display faces the viewer."""
    shapes: list[Shape] = [("poly", _rect(centre, 0.1, 0.18, deg), "phone", None)]
    if screen:
        shapes.append(("poly", _rect(centre, 0.075, 0.145, deg), "screen", None))
    return shapes


def _mug(centre: complex, deg: float) -> list[Shape]:
    """A mug with a handle, tilted by `deg` degrees."""
    side = cmath.exp(1j * math.radians(deg))
    return [
        ("disc", centre - 0.055 * side, 0.03, "none", "cup"),
        ("poly", _rect(centre, 0.09, 0.12, deg), "cup", "fig"),
    ]


def _plate(centre: complex) -> list[Shape]:
    """A white plate seen from the side with a heap of food on it."""
    return [
        ("disc", centre - 0.035j, 0.05, "food", "food"),
        ("poly", _arc(centre, 0.15, 0.04, 0, 360, 18), "plate", "fig"),
    ]


def _jit(rng: np.random.Generator, sd: float = 0.015) -> complex:
    """Small random 2D offset used to jitter target points."""
    return complex(rng.normal(0, sd), rng.normal(0, sd))


def _mirror(shapes: list[Shape], x0: float) -> list[Shape]:
    """Mirror shapes about the vertical line x = x0."""
    flip = lambda z: complex(2 * x0 - z.real, z.imag)  # noqa: E731
    return [(s[0], flip(s[1]) if s[0] == "disc" else [flip(z) for z in s[1]]) + s[2:] for s in shapes]


# --------------------------------------------------------------------------------------------- scenes


def _calling(rng: np.random.Generator) -> list[Shape]:
    """One hand at the ear holding a phone, the other arm relaxed or on the hip."""
    p = _proportions(rng)
    b = _body(p, 0j, rng.normal(0, 4), rng.uniform(-5, 15))
    ear = b["head"] - 0.2 * p["head"] * b["forward"] + 0.3 * p["head"] * (-b["head_up"]) + _jit(rng, 0.01)
    arm = _reach(b["shoulder"], ear, p["upper_arm"], p["forearm"], bend=1)
    other = _arms_down(rng, p, b["shoulder"])[int(rng.integers(2))]
    if rng.random() < 0.5:  # other hand on the hip
        other = _reach(b["shoulder"], b["hip"] + complex(-0.05, -0.03), p["upper_arm"], p["forearm"], bend=-1)
    phone = _phone(
        arm[2] + 0.03 * b["forward"] - 0.03 * b["head_up"],
        math.degrees(cmath.phase(b["head_up"])) + 90 + rng.normal(0, 10),
        screen=False,
    )
    return _person(p, b, [arm, other] + _legs_standing(rng, p, 0j)) + phone


def _clapping(rng: np.random.Generator) -> list[Shape]:
    """Front view: elbows out, both hands meeting in front of the chest, with motion marks."""
    p = _proportions(rng)
    b = _body(p, 0j, rng.normal(0, 3), rng.normal(0, 6))
    meet = b["shoulder"] + complex(rng.normal(0, 0.015), rng.uniform(0.03, 0.12))
    arms = [
        _reach(b["shoulder"], meet + 0.012, p["upper_arm"], p["forearm"], bend=-1),
        _reach(b["shoulder"], meet - 0.012, p["upper_arm"], p["forearm"], bend=1),
    ]
    # Front view: push the elbows out sideways so the arms form a diamond.
    for arm, side in zip(arms, (1, -1)):
        arm[1] = b["shoulder"] + side * float(rng.uniform(0.13, 0.17)) + complex(0, rng.uniform(0.08, 0.14))
    marks: list[Shape] = []
    for deg in (-50, 0, 50):
        for side in (1, -1):
            u = side * cmath.exp(1j * math.radians(deg + rng.normal(0, 10)))
            marks.append(("line", [meet + 0.07 * u, meet + 0.15 * u], 0.6, "fig"))
    return _person(p, b, arms + _legs_standing(rng, p, 0j)) + marks


def _cycling(rng: np.random.Generator) -> list[Shape]:
    """Side view: rider leaning over a bicycle, hands on the bar, feet on the pedals."""
    p = _proportions(rng)
    r = float(rng.uniform(0.15, 0.19))
    base = float(rng.uniform(0.52, 0.62))
    rear, front = complex(-base / 2, 0.0), complex(base / 2, 0.0)
    crank = complex(rng.normal(0, 0.02), 0.0)
    seat = crank + complex(-0.08, -0.3)
    bar = front + complex(-0.06, -0.33)
    bike: list[Shape] = [
        ("disc", rear, r, "none", "bike"),
        ("disc", front, r, "none", "bike"),
        ("line", [rear, seat, crank, rear], 0.7, "bike"),
        ("line", [crank, bar - 0.02j, bar + 0.05 - 0.02j], 0.7, "bike"),
        ("line", [seat, bar], 0.7, "bike"),
    ]
    hip = seat - 0.04j
    b = _body(p, hip, rng.uniform(30, 50), rng.uniform(-25, -5))
    phase = float(rng.uniform(0, 360))
    pedals = [crank + 0.08 * cmath.exp(1j * math.radians(phase + k * 180)) for k in (0, 1)]
    legs = [_reach(hip, ped, p["thigh"], p["shin"], bend=-1) for ped in pedals]
    arms = [_reach(b["shoulder"], bar + 0.03 + _jit(rng, 0.01), p["upper_arm"], p["forearm"], bend=1) for _ in range(2)]
    return bike + _person(p, b, arms + legs)


def _dancing(rng: np.random.Generator) -> list[Shape]:
    """Front view: arms raised, legs wide apart, body tilted."""
    p = _proportions(rng)
    b = _body(p, 0j, rng.uniform(8, 22) * rng.choice([-1, 1]), rng.normal(0, 15))
    a1, a2 = float(rng.uniform(120, 165)), float(rng.uniform(100, 165))
    if rng.random() < 0.3:  # one arm out to the side
        a2 = float(rng.uniform(70, 100))
    arms = [
        _limb(b["shoulder"], a1, a1 + rng.normal(10, 20), p["upper_arm"], p["forearm"]),
        _limb(b["shoulder"], -a2, -a2 - rng.normal(10, 20), p["upper_arm"], p["forearm"]),
    ]
    l1, l2 = float(rng.uniform(25, 40)), float(rng.uniform(20, 40))
    legs = [
        _limb(0j, l1, l1 + rng.uniform(-25, 5), p["thigh"], p["shin"]),
        _limb(0j, -l2, -l2 + rng.uniform(-5, 25), p["thigh"], p["shin"]),
    ]
    if rng.random() < 0.35:  # one knee lifted
        legs[0] = _limb(0j, rng.uniform(60, 95), rng.uniform(-10, 20), p["thigh"], p["shin"])
    return _person(p, b, arms + legs)


def _drinking(rng: np.random.Generator) -> list[Shape]:
    """Head tilted back, one hand lifting a mug to the mouth."""
    p = _proportions(rng)
    seated = rng.random() < 0.1
    b = _body(p, 0j, rng.normal(-4, 4), rng.uniform(-40, -20))
    cup_centre = _mouth_point(p, b) + 0.06 * b["forward"] + 0.02 * b["head_up"] + _jit(rng, 0.008)
    arm = _reach(b["shoulder"], cup_centre + 0.05, p["upper_arm"], p["forearm"], bend=1)
    other = _arms_down(rng, p, b["shoulder"])[0]
    legs = _legs_seated(rng, p, 0j) if seated else _legs_standing(rng, p, 0j)
    scene = _person(p, b, [arm, other] + legs) + _mug(cup_centre, rng.uniform(-55, -25))
    return (_chair(p, 0j, rng) + scene) if seated else scene


def _eating(rng: np.random.Generator) -> list[Shape]:
    """A fork at the mouth and a plate, usually on a table, sometimes held in front of the body."""
    p = _proportions(rng)
    at_table = rng.random() < 0.6
    b = _body(p, 0j, rng.uniform(0, 12), rng.uniform(0, 20))
    mouth = _mouth_point(p, b)
    hand = mouth + complex(0.08, 0.06) + _jit(rng, 0.01)
    arm = _reach(b["shoulder"], hand, p["upper_arm"], p["forearm"], bend=1)
    tip = mouth + 0.015
    along = (tip - hand) / abs(tip - hand)
    fork: list[Shape] = [("line", [hand, tip], 0.6, "metal")]
    fork += [("line", [tip, tip + 0.035 * along * cmath.exp(1j * math.radians(d))], 0.4, "metal") for d in (-25, 0, 25)]
    if at_table:
        top = b["hip"].imag - float(rng.uniform(0.02, 0.08))
        plate_c = complex(b["shoulder"].real + 0.24, top - 0.04)
        other = _reach(b["shoulder"], plate_c - 0.12, p["upper_arm"], p["forearm"], bend=1)
        legs = _legs_seated(rng, p, 0j)
        setting = _chair(p, 0j, rng) + _table(p, plate_c.real - 0.2, plate_c.real + 0.22, top)
    else:
        plate_c = b["shoulder"] + complex(rng.uniform(0.2, 0.26), rng.uniform(0.12, 0.2))
        other = _reach(b["shoulder"], plate_c - 0.06, p["upper_arm"], p["forearm"], bend=1)
        legs = _legs_standing(rng, p, 0j)
        setting = []
    return setting + _person(p, b, [arm, other] + legs) + _plate(plate_c) + fork


def _fighter(rng: np.random.Generator, p: dict[str, float], hip: complex, key: str) -> list[Shape]:
    """One fighter facing +x: wide stance, forward lean, a straight punch and a guard."""
    b = _body(p, hip, rng.uniform(8, 20), rng.uniform(0, 15))
    punch_deg = float(rng.uniform(95, 125))
    punch = _limb(b["shoulder"], punch_deg, punch_deg + rng.normal(0, 6), p["upper_arm"], p["forearm"])
    guard = _reach(b["shoulder"], b["head"] + complex(0.07, 0.08), p["upper_arm"], p["forearm"], bend=1)
    l1, l2 = float(rng.uniform(25, 40)), float(rng.uniform(25, 40))
    legs = [
        _limb(hip, l1, l1 - rng.uniform(0, 20), p["thigh"], p["shin"]),
        _limb(hip, -l2, -l2 + rng.uniform(0, 10), p["thigh"], p["shin"]),
    ]
    gloves: list[Shape] = [("disc", arm[2], 0.05, "gloves", "gloves") for arm in (punch, guard)]
    return _person(p, b, [punch, guard] + legs, key) + gloves


def _fighting(rng: np.random.Generator) -> list[Shape]:
    """Two boxers facing each other, punching."""
    gap = float(rng.uniform(0.58, 0.72))
    left = _fighter(rng, _proportions(rng), 0j, "fig")
    right = _mirror(_fighter(rng, _proportions(rng), 0j, "fig2"), gap / 2)
    return left + right


def _hugging(rng: np.random.Generator) -> list[Shape]:
    """Two figures close together, arms wrapped across each other's back."""
    gap = float(rng.uniform(0.14, 0.2))
    shapes: list[Shape] = []
    for key, x in (("fig", 0.0), ("fig2", gap)):
        p = _proportions(rng)
        b = _body(p, complex(x, rng.normal(0, 0.02)), rng.uniform(5, 12), rng.uniform(5, 20))
        y = b["shoulder"].imag + float(rng.uniform(0.03, 0.08))
        arms = [
            _reach(b["shoulder"], complex(gap + 0.12 + rng.normal(0, 0.02), y), p["upper_arm"], p["forearm"], bend=1),
            _reach(
                b["shoulder"],
                complex(gap + 0.1 + rng.normal(0, 0.02), y + rng.uniform(0.04, 0.1)),
                p["upper_arm"],
                p["forearm"],
                bend=1,
            ),
        ]
        person = _person(p, b, arms + _legs_standing(rng, p, b["hip"]), key)
        shapes += person if key == "fig" else _mirror(person, gap / 2)
    return shapes


def _laughing(rng: np.random.Generator) -> list[Shape]:
    """Body leaning back, head thrown back with a wide open mouth and squeezed eyes, hands on the belly."""
    p = _proportions(rng)
    b = _body(p, 0j, rng.uniform(-25, -12), rng.uniform(-40, -20))
    belly = b["hip"] + complex(0.06, -0.1)
    arms = [_reach(b["shoulder"], belly + _jit(rng), p["upper_arm"], p["forearm"], bend=1) for _ in range(2)]
    if rng.random() < 0.3:  # one hand pointing forward
        arms[1] = _limb(b["shoulder"], 95, 100 + rng.normal(0, 8), p["upper_arm"], p["forearm"])
    r, fwd, up = p["head"], b["forward"], b["head_up"]
    centre = b["head"] + 0.25 * r * fwd + 0.1 * r * up
    mouth = [centre + 0.7 * r * fwd * cmath.exp(1j * t) for t in np.linspace(-0.2, math.pi * 0.75, 10)]
    eye = [
        b["head"] + r * (0.45 * fwd + 0.35 * up + 0.2 * fwd * cmath.exp(1j * t)) for t in np.linspace(-math.pi, 0, 6)
    ]
    marks: list[Shape] = []
    for k in range(3):
        u = fwd * cmath.exp(-1j * math.radians(20 + 35 * k + rng.normal(0, 6)))
        marks.append(("line", [b["head"] + 1.5 * r * u, b["head"] + 2.4 * r * u], 0.6, "fig"))
    face: list[Shape] = [("poly", mouth, "mouth", None), ("line", eye, 0.3, "mouth")]
    return _person(p, b, arms + _legs_standing(rng, p, 0j)) + face + marks


def _listening(rng: np.random.Generator) -> list[Shape]:
    """Headphones over the head (band and two ear cups) and a few music notes; sometimes a hand on a cup."""
    p = _proportions(rng)
    b = _body(p, 0j, rng.normal(0, 8), rng.normal(0, 12))
    r, up = p["head"], b["head_up"]
    side = up * 1j
    band = [b["head"] + 1.25 * r * (side * math.cos(t) + up * math.sin(t)) for t in np.linspace(0, math.pi, 12)]
    cup_deg = math.degrees(cmath.phase(up)) + 90
    cups: list[Shape] = [
        ("poly", _rect(b["head"] + s * 1.05 * r * side, 0.08, 0.13, cup_deg), "headphones", None) for s in (1, -1)
    ]
    arms = _arms_down(rng, p, b["shoulder"])
    if rng.random() < 0.25:
        arms[0] = _reach(b["shoulder"], b["head"] + 1.3 * r * side + 0.02, p["upper_arm"], p["forearm"], bend=1)
    notes: list[Shape] = []
    for _ in range(int(rng.integers(1, 3))):
        at = b["head"] + float(rng.choice([-1, 1])) * rng.uniform(0.2, 0.3) + rng.uniform(-0.05, 0.1) * up
        notes += [
            ("disc", at, 0.03, "note", "note"),
            ("line", [at + 0.025, at + 0.025 - 0.12j, at + 0.07 - 0.08j], 0.5, "note"),
        ]
    return _person(p, b, arms + _legs_standing(rng, p, 0j)) + [("line", band, 1.0, "headphones")] + cups + notes


def _running(rng: np.random.Generator) -> list[Shape]:
    """Side view: forward lean, long stride, elbows bent at about 90 degrees."""
    p = _proportions(rng)
    b = _body(p, 0j, rng.uniform(12, 25), rng.uniform(-5, 10))
    front_thigh, back_thigh = float(rng.uniform(45, 75)), float(rng.uniform(-50, -30))
    legs = [
        _limb(0j, front_thigh, front_thigh - rng.uniform(40, 70), p["thigh"], p["shin"]),
        _limb(0j, back_thigh, back_thigh - rng.uniform(30, 70), p["thigh"], p["shin"]),
    ]
    fa, ba = float(rng.uniform(30, 60)), float(rng.uniform(-60, -35))
    arms = [
        _limb(b["shoulder"], fa, fa + rng.uniform(80, 110), p["upper_arm"], p["forearm"]),
        _limb(b["shoulder"], ba, ba + rng.uniform(80, 110), p["upper_arm"], p["forearm"]),
    ]
    return _person(p, b, arms + legs)


def _sitting(rng: np.random.Generator) -> list[Shape]:
    """Side view: upright on a chair, hands resting on the lap or knees."""
    p = _proportions(rng)
    b = _body(p, 0j, rng.uniform(-8, 8), rng.uniform(-5, 15))
    legs = _legs_seated(rng, p, 0j)
    knee = legs[0][1]
    arms = [
        _reach(b["shoulder"], knee + complex(-rng.uniform(0.0, 0.12), -0.02), p["upper_arm"], p["forearm"], bend=1)
        for _ in range(2)
    ]
    if rng.random() < 0.3:  # one arm on the backrest
        arms[1] = _limb(b["shoulder"], -rng.uniform(10, 30), rng.uniform(-10, 10), p["upper_arm"], p["forearm"] * 0.8)
    return _chair(p, 0j, rng) + _person(p, b, arms + legs)


def _sleeping(rng: np.random.Generator) -> list[Shape]:
    """A figure lying on its back on a bed with a pillow, sometimes under a blanket."""
    p = _proportions(rng)
    # A lying figure: the body's "up" points to -x, so the head is on the left.
    b = _body(p, 0j, -90 + rng.normal(0, 4), rng.normal(-5, 10))
    k = float(rng.uniform(0, 25))
    legs = [
        _limb(0j, 90 - k, 90 + k, p["thigh"], p["shin"]),
        _limb(0j, 90 + rng.normal(0, 4), 90 + rng.normal(0, 4), p["thigh"], p["shin"]),
    ]
    arms = [
        _limb(b["shoulder"], 90 + rng.normal(0, 8), 90 + rng.normal(0, 12), p["upper_arm"], p["forearm"])
        for _ in range(2)
    ]
    if rng.random() < 0.3:  # hand under the head
        arms[0] = _reach(b["shoulder"], b["head"] + complex(0.02, 0.05), p["upper_arm"], p["forearm"], bend=1)
    top = p["head"] + 0.02
    left = b["head"].real - p["head"] - 0.1
    right = p["thigh"] + p["shin"] + 0.08
    bed: list[Shape] = [
        ("poly", _rect(complex((left + right) / 2, top + 0.05), right - left, 0.1), "sheet", "wood"),
        ("line", [complex(left, top - 0.15), complex(left, top + 0.22)], 1.0, "wood"),
        ("line", [complex(right, top + 0.05), complex(right, top + 0.22)], 1.0, "wood"),
        ("poly", _arc(b["head"] + complex(0.0, p["head"] + 0.015), 0.11, 0.04, 0, 360, 14), "pillow", "wood"),
    ]
    blanket: list[Shape] = []
    if rng.random() < 0.4:
        x0 = b["shoulder"].real + 0.12
        corners = [
            complex(x0, -0.07),
            complex(right - 0.03, -0.06),
            complex(right - 0.03, top + 0.02),
            complex(x0, top + 0.02),
        ]
        blanket = [("poly", corners, "blanket", None)]
    return bed + _person(p, b, arms + legs) + blanket


def _texting(rng: np.random.Generator) -> list[Shape]:
    """Head bowed, both hands holding a phone with a lit screen in front of the chest."""
    p = _proportions(rng)
    seated = rng.random() < 0.1
    b = _body(p, 0j, rng.uniform(-2, 10), rng.uniform(30, 50))
    phone_c = b["shoulder"] + complex(rng.uniform(0.12, 0.17), rng.uniform(0.05, 0.12))
    arms = [
        _reach(b["shoulder"], phone_c + complex(d, 0.03), p["upper_arm"], p["forearm"], bend=-1) for d in (-0.03, 0.02)
    ]
    legs = _legs_seated(rng, p, 0j) if seated else _legs_standing(rng, p, 0j)
    scene = _person(p, b, arms + legs) + _phone(phone_c, rng.uniform(-70, -40), screen=True)
    return (_chair(p, 0j, rng) + scene) if seated else scene


def _using_laptop(rng: np.random.Generator) -> list[Shape]:
    """Seated at a table with an open laptop, hands on the keyboard; sometimes the laptop is on the lap."""
    p = _proportions(rng)
    b = _body(p, 0j, rng.uniform(0, 15), rng.uniform(10, 30))
    legs = _legs_seated(rng, p, 0j)
    if rng.random() < 0.15:  # on the lap
        base_y, x0 = legs[0][1].imag - 0.04, 0.05
        table: list[Shape] = []
    else:
        base_y = b["hip"].imag - float(rng.uniform(0.06, 0.12))
        x0 = b["shoulder"].real + float(rng.uniform(0.1, 0.16))
        table = _table(p, x0 - 0.04, x0 + 0.32, base_y + 0.03)
    width = float(rng.uniform(0.2, 0.24))
    hinge = complex(x0 + width, base_y)
    screen_top = hinge - width * 0.9 * cmath.exp(1j * math.radians(rng.uniform(95, 120)))  # opens up and away
    toward_user = -0.02 + 0j
    laptop: list[Shape] = [
        ("line", [complex(x0, base_y), hinge], 0.9, "laptop"),
        ("line", [hinge, screen_top], 1.8, "laptop"),
        ("line", [hinge + toward_user - 0.02j, screen_top + toward_user + 0.02j], 1.2, "screen"),
    ]
    arms = [
        _reach(b["shoulder"], complex(x0 + d, base_y - 0.02), p["upper_arm"], p["forearm"], bend=1)
        for d in (0.03, 0.08)
    ]
    return _chair(p, 0j, rng) + table + _person(p, b, arms + legs) + laptop


SCENES: tuple[Callable[[np.random.Generator], list[Shape]], ...] = (
    _calling,
    _clapping,
    _cycling,
    _dancing,
    _drinking,
    _eating,
    _fighting,
    _hugging,
    _laughing,
    _listening,
    _running,
    _sitting,
    _sleeping,
    _texting,
    _using_laptop,
)

# How each action is usually photographed: (full body, upper body, head and shoulders) probabilities.
FRAMING: dict[str, tuple[float, float, float]] = {
    "calling": (0.35, 0.5, 0.15),
    "clapping": (0.6, 0.4, 0.0),
    "cycling": (1.0, 0.0, 0.0),
    "dancing": (0.9, 0.1, 0.0),
    "drinking": (0.35, 0.5, 0.15),
    "eating": (0.6, 0.4, 0.0),
    "fighting": (0.8, 0.2, 0.0),
    "hugging": (0.6, 0.4, 0.0),
    "laughing": (0.2, 0.25, 0.55),
    "listening_to_music": (0.35, 0.4, 0.25),
    "running": (0.9, 0.1, 0.0),
    "sitting": (1.0, 0.0, 0.0),
    "sleeping": (1.0, 0.0, 0.0),
    "texting": (0.4, 0.5, 0.1),
    "using_laptop": (0.8, 0.2, 0.0),
}
# Lowest point (figure units, hip at 0) that a framing must keep in the picture.
FRAMING_CUT = (math.inf, 0.02, -0.2)


# --------------------------------------------------------------------------------------------- backgrounds


def _hsv(
    rng: np.random.Generator, hue: tuple[float, float], sat: tuple[float, float], val: tuple[float, float]
) -> np.ndarray:
    """A random colour with hue, saturation and value drawn from the given ranges, as float RGB 0-255."""
    h, s, v = (float(rng.uniform(*r)) for r in (hue, sat, val))
    return np.asarray(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32) * 255


def _gradient(top: np.ndarray, bottom: np.ndarray, w: int, h: int) -> np.ndarray:
    """A vertical top-to-bottom colour ramp, float HxWx3."""
    t = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
    return np.broadcast_to(top + (bottom - top) * t, (h, w, 3)).copy()


def _plain(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Setting-free background: a muted two-colour ramp or low-frequency colour noise."""
    muted = lambda: _hsv(rng, (0, 1), (0, 0.35), (0.65, 0.97))  # noqa: E731
    if rng.random() < 0.5:
        c1, c2 = muted(), muted()
        theta = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        t = xx * math.cos(theta) / w + yy * math.sin(theta) / h
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        return c1 + (c2 - c1) * t[..., None]
    gh, gw = int(rng.integers(2, 6)), int(rng.integers(2, 6))
    grid = np.stack([muted() for _ in range(gh * gw)]).reshape(gh, gw, 3)
    return np.asarray(
        Image.fromarray(grid.astype(np.uint8), "RGB").resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32
    )


def _outdoor(rng: np.random.Generator, w: int, h: int, ground: str) -> np.ndarray:
    """Pale sky over a park (grass), a country road (asphalt), a street (asphalt, buildings), a running track or a
    beach."""
    arr = _gradient(
        _hsv(rng, (0.52, 0.62), (0.2, 0.5), (0.85, 1.0)), _hsv(rng, (0.5, 0.6), (0.0, 0.2), (0.9, 1.0)), w, h
    )
    horizon = int(h * rng.uniform(0.55, 0.7))
    if ground in ("park", "road"):
        colour = _hsv(rng, (0.2, 0.35), (0.35, 0.65), (0.55, 0.8))
    elif ground == "beach":
        arr[horizon - max(3, h // 10) : horizon] = _hsv(rng, (0.52, 0.6), (0.5, 0.8), (0.6, 0.85))  # the sea
        colour = _hsv(rng, (0.1, 0.15), (0.25, 0.5), (0.85, 0.97))
    elif ground == "street":
        colour = _hsv(rng, (0.0, 1.0), (0.0, 0.08), (0.45, 0.65))
        if rng.random() < 0.7:  # buildings on the horizon
            for x in range(0, w, max(4, w // 6)):
                top = int(horizon * rng.uniform(0.3, 0.8))
                arr[top:horizon, x : x + max(3, w // 7)] = _hsv(rng, (0.0, 0.15), (0.0, 0.3), (0.6, 0.85))
    else:
        colour = _hsv(rng, (0.0, 0.04), (0.5, 0.7), (0.6, 0.8))
    arr[horizon:] = _gradient(colour, colour * 0.85, w, h - horizon)
    lines = max(2, h // 60)
    if ground == "street":
        y = horizon + int((h - horizon) * 0.6)
        for x in range(0, w, max(8, w // 8)):
            arr[y : y + lines, x : x + max(4, w // 16)] = 250
    elif ground == "track":
        for frac in (0.3, 0.65):
            y = horizon + int((h - horizon) * frac)
            arr[y : y + lines] = 250
    elif ground == "road":  # asphalt from a thin grass verge down, with a dashed yellow centre line
        y = horizon + max(2, int((h - horizon) * rng.uniform(0.1, 0.2)))
        arr[y:] = _hsv(rng, (0.0, 1.0), (0.0, 0.08), (0.4, 0.55))
        mid = y + int((h - y) * rng.uniform(0.45, 0.6))
        for x in range(int(rng.integers(0, max(2, w // 8))), w, max(8, w // 6)):
            arr[mid : mid + lines, x : x + max(4, w // 12)] = _hsv(rng, (0.12, 0.16), (0.7, 0.9), (0.85, 1.0))
    return arr


def _stage(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A stage: light backdrop between red curtains, wooden boards below."""
    arr = _gradient(_hsv(rng, (0.0, 1.0), (0.0, 0.2), (0.8, 0.97)), _hsv(rng, (0.0, 1.0), (0.0, 0.2), (0.7, 0.9)), w, h)
    curtain = _hsv(rng, (0.96, 1.02), (0.65, 0.9), (0.5, 0.7))
    # Curtains reach into the central square, so that they survive the evaluation center crop.
    side = min(w, h)
    cw = (w - side) // 2 + int(side * rng.uniform(0.12, 0.18))
    arr[:, :cw] = curtain
    arr[:, w - cw :] = curtain
    arr[: int(h * rng.uniform(0.06, 0.12))] = curtain
    arr[int(h * rng.uniform(0.75, 0.85)) :] = _hsv(rng, (0.06, 0.1), (0.45, 0.7), (0.45, 0.65))
    return arr


def _ring(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A boxing ring: light hall, coloured canvas floor and three ropes."""
    arr = _gradient(
        _hsv(rng, (0.0, 1.0), (0.0, 0.15), (0.75, 0.95)), _hsv(rng, (0.0, 1.0), (0.0, 0.15), (0.65, 0.85)), w, h
    )
    floor = int(h * rng.uniform(0.68, 0.8))
    arr[floor:] = _hsv(rng, (0.55, 0.65), (0.4, 0.7), (0.55, 0.8))
    rope_colour = _hsv(rng, (0.97, 1.03), (0.6, 0.9), (0.7, 0.95))
    thickness = max(2, h // 45)
    for frac in (0.35, 0.5, 0.65):
        y = int(floor * frac / 0.65 * 0.9)
        arr[y : y + thickness] = rope_colour
    return arr


def _room(
    rng: np.random.Generator, w: int, h: int, hue: tuple[float, float], floor_hue: tuple[float, float]
) -> np.ndarray:
    """A wall of the given hue range over a floor, with a window or a picture on the wall."""
    arr = _gradient(_hsv(rng, hue, (0.1, 0.35), (0.75, 0.95)), _hsv(rng, hue, (0.1, 0.35), (0.65, 0.88)), w, h)
    floor = int(h * rng.uniform(0.72, 0.86))
    arr[floor:] = _hsv(rng, floor_hue, (0.3, 0.55), (0.5, 0.72))
    fw, fh = int(w * rng.uniform(0.12, 0.25)), int(h * rng.uniform(0.15, 0.3))
    x0 = int(rng.choice([rng.uniform(0.02, 0.2), rng.uniform(0.6, 0.85)]) * w)
    y0 = int(h * rng.uniform(0.08, 0.3))
    arr[y0 : y0 + fh, x0 : x0 + fw] = (
        _hsv(rng, (0.5, 0.6), (0.2, 0.5), (0.85, 1.0))
        if rng.random() < 0.5
        else _hsv(rng, (0, 1), (0.2, 0.5), (0.6, 0.9))
    )
    return arr


def _tiles(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A kitchen: light tiles with grout lines above a counter band."""
    tile = _hsv(rng, (0, 1), (0.0, 0.2), (0.85, 1.0))
    arr = np.broadcast_to(tile, (h, w, 3)).copy()
    step = max(8, int(min(w, h) * rng.uniform(0.1, 0.16)))
    grout = tile * 0.7
    line = max(2, step // 6)
    for k in range(line):
        arr[k::step] = grout
        arr[:, k::step] = grout
    counter = int(h * rng.uniform(0.7, 0.85))
    arr[counter:] = _hsv(rng, (0.05, 0.12), (0.15, 0.35), (0.6, 0.8))
    return arr


def _office(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """An office: pale wall, a wide window with horizontal blinds behind the person, a grey desk below."""
    arr = _gradient(
        _hsv(rng, (0.55, 0.65), (0.03, 0.15), (0.8, 0.95)), _hsv(rng, (0.55, 0.65), (0.03, 0.15), (0.7, 0.88)), w, h
    )
    side = min(w, h)  # the window spans the central square, so that it survives the evaluation center crop
    x0 = (w - side) // 2 + int(side * rng.uniform(0.05, 0.2))
    x1 = (w + side) // 2 - int(side * rng.uniform(0.05, 0.2))
    y0, y1 = int(h * rng.uniform(0.08, 0.18)), int(h * rng.uniform(0.55, 0.68))
    arr[y0:y1, x0:x1] = _hsv(rng, (0.52, 0.6), (0.15, 0.4), (0.85, 1.0))
    slat = _hsv(rng, (0.0, 1.0), (0.0, 0.1), (0.6, 0.75))
    step = max(4, int(side * rng.uniform(0.05, 0.07)))
    for y in range(y0, y1, step):
        arr[y : y + max(1, step // 3), x0:x1] = slat
    arr[int(h * rng.uniform(0.75, 0.85)) :] = _hsv(rng, (0.0, 1.0), (0.0, 0.08), (0.35, 0.55))
    return arr


def _cafe(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A cafe: wood-panelled wall with shelves of bottles behind a light counter."""
    arr = np.broadcast_to(_hsv(rng, (0.05, 0.1), (0.3, 0.5), (0.6, 0.78)), (h, w, 3)).copy()
    thickness = max(2, h // 50)
    for frac in (0.18, 0.38):
        y = int(h * (frac + rng.uniform(-0.03, 0.03)))
        arr[y : y + thickness] = _hsv(rng, (0.05, 0.1), (0.4, 0.6), (0.3, 0.45))
        for x in range(int(rng.integers(0, max(2, w // 10))), w, max(6, w // 9)):
            bh = max(4, int(h * rng.uniform(0.06, 0.12)))
            arr[max(0, y - bh) : y, x : x + max(2, w // 30)] = _hsv(rng, (0.0, 1.0), (0.5, 0.9), (0.5, 0.9))
    arr[int(h * rng.uniform(0.72, 0.82)) :] = _hsv(rng, (0.0, 1.0), (0.0, 0.1), (0.85, 0.97))
    return arr


def _party(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """A light backdrop sprinkled with confetti and a few streamers."""
    img = Image.fromarray(_plain(rng, w, h).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    r = max(3, min(w, h) // 25)
    for _ in range(int(rng.integers(12, 30))):
        x, y = float(rng.uniform(0, w)), float(rng.uniform(0, h))
        colour = tuple(int(v) for v in _hsv(rng, (0, 1), (0.5, 0.9), (0.75, 1.0)))
        draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
    for _ in range(int(rng.integers(1, 4))):
        x0 = float(rng.uniform(0, w))
        pts = [(x0 + float(rng.normal(0, w / 20)), y) for y in np.linspace(0, h * rng.uniform(0.15, 0.35), 6)]
        draw.line(pts, fill=tuple(int(v) for v in _hsv(rng, (0, 1), (0.5, 0.9), (0.75, 1.0))), width=r)
    return img


SETTINGS = (
    "plain",
    "park",
    "road",
    "street",
    "track",
    "beach",
    "ring",
    "stage",
    "living_room",
    "bedroom",
    "kitchen",
    "cafe",
    "office",
    "party",
)

# Where each action is usually photographed. Scene context is a real, and sometimes misleading, cue in
# action photos; classes that share a setting (sitting/using_laptop, listening_to_music/sleeping) stay confusable.
USUAL_SETTING: dict[str, str] = {
    "calling": "office",
    "clapping": "stage",
    "cycling": "road",
    "dancing": "party",
    "drinking": "cafe",
    "eating": "kitchen",
    "fighting": "ring",
    "hugging": "beach",
    "laughing": "park",
    "listening_to_music": "bedroom",
    "running": "track",
    "sitting": "living_room",
    "sleeping": "bedroom",
    "texting": "street",
    "using_laptop": "living_room",
}


def _pick_setting(label: int, rng: np.random.Generator) -> str:
    """The action's usual setting with probability CONTEXT_FRACTION, else any setting."""
    if rng.random() < CONTEXT_FRACTION:
        return USUAL_SETTING[CLASS_NAMES[label]]
    return SETTINGS[int(rng.integers(len(SETTINGS)))]


def _background(rng: np.random.Generator, w: int, h: int, setting: str) -> Image.Image:
    """Background for a setting, plus a few faint clutter shapes."""
    if setting == "party":
        img = _party(rng, w, h)
    else:
        arr = {
            "plain": lambda: _plain(rng, w, h),
            "park": lambda: _outdoor(rng, w, h, "park"),
            "road": lambda: _outdoor(rng, w, h, "road"),
            "beach": lambda: _outdoor(rng, w, h, "beach"),
            "stage": lambda: _stage(rng, w, h),
            "street": lambda: _outdoor(rng, w, h, "street"),
            "track": lambda: _outdoor(rng, w, h, "track"),
            "ring": lambda: _ring(rng, w, h),
            "living_room": lambda: _room(rng, w, h, (0.05, 0.16), (0.05, 0.1)),
            "bedroom": lambda: _room(rng, w, h, (0.6, 0.85), (0.55, 0.7)),
            "kitchen": lambda: _tiles(rng, w, h),
            "cafe": lambda: _cafe(rng, w, h),
            "office": lambda: _office(rng, w, h),
        }[setting]()
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    mean = np.asarray(img.resize((4, 4)), dtype=np.float32).reshape(-1, 3).mean(0)
    for _ in range(int(rng.integers(0, MAX_CLUTTER + 1))):
        alpha = float(rng.uniform(0.15, 0.4))
        colour = tuple(int(v) for v in (1 - alpha) * mean + alpha * rng.integers(0, 256, 3))
        x0, y0 = float(rng.uniform(0, w)), float(rng.uniform(0, h))
        x1, y1 = x0 + float(rng.uniform(-0.4, 0.4)) * w, y0 + float(rng.uniform(-0.4, 0.4)) * h
        kind = rng.integers(3)
        box = [min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)]
        if kind == 0:
            draw.rectangle(box, fill=colour)
        elif kind == 1:
            draw.ellipse(box, fill=colour)
        else:
            draw.line([x0, y0, x1, y1], fill=colour, width=int(rng.integers(1, max(2, min(w, h) // 30))))
    return img


# --------------------------------------------------------------------------------------------- colours and drawing


def _luma(c: tuple[float, float, float]) -> float:
    """Perceived brightness of an RGB colour, 0-255."""
    return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]


def _colour(
    rng: np.random.Generator, hue: tuple[float, float], sat: tuple[float, float], val: tuple[float, float]
) -> tuple[int, int, int]:
    """A random colour from hue, saturation and value ranges, as 8-bit RGB."""
    r, g, b = _hsv(rng, hue, sat, val)
    return (round(float(r)), round(float(g)), round(float(b)))


def _palette(rng: np.random.Generator) -> Palette:
    """Colours: dark figures of any hue, and props in the colours such things usually have."""
    any_hue = (0.0, 1.0)
    ink = lambda: _colour(rng, any_hue, (0.0, 0.9), (0.0, 0.3))  # noqa: E731
    paint = lambda: _colour(rng, any_hue, (0.6, 1.0), (0.55, 0.9))  # noqa: E731
    white = lambda: _colour(rng, any_hue, (0.0, 0.08), (0.92, 1.0))  # noqa: E731
    fig = ink()
    colours = {
        "fig": fig,
        "fig2": ink(),
        "head": fig if rng.random() < 0.6 else ink(),
        "phone": _colour(rng, any_hue, (0.0, 0.3), (0.05, 0.3)),
        "screen": _colour(rng, (0.48, 0.6), (0.35, 0.7), (0.9, 1.0)),
        "laptop": _colour(rng, any_hue, (0.0, 0.1), (0.45, 0.7)),
        "cup": white() if rng.random() < 0.5 else paint(),
        "plate": white(),
        "food": _colour(rng, (0.0, 0.35), (0.6, 0.9), (0.6, 0.9)),
        "metal": _colour(rng, any_hue, (0.0, 0.1), (0.5, 0.7)),
        "headphones": paint(),
        "note": ink(),
        "wood": _colour(rng, (0.05, 0.11), (0.4, 0.75), (0.3, 0.6)),
        "sheet": white(),
        "pillow": _colour(rng, (0.5, 0.65), (0.05, 0.3), (0.9, 1.0)),
        "blanket": paint(),
        "bike": paint(),
        "gloves": _colour(rng, (0.97, 1.03), (0.7, 0.95), (0.6, 0.9)) if rng.random() < 0.6 else paint(),
    }
    colours["mouth"] = (255, 255, 255) if _luma(colours["head"]) < 128 else (20, 20, 20)
    return colours


def _transform(
    shapes: list[Shape], rng: np.random.Generator, w: int, h: int, cut: float, pad: float
) -> tuple[list[Shape], float]:
    """Rotate, mirror, scale and place the scene in the central square; points above `cut`, plus `pad`, must fit."""
    rot = cmath.exp(1j * math.radians(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG)))
    mirror = rng.random() < 0.5

    def move(z: complex) -> complex:
        z = z * rot
        return complex(-z.real, z.imag) if mirror else z

    moved: list[Shape] = []
    xs: list[float] = []
    ys: list[float] = []
    for s in shapes:
        if s[0] == "disc":
            c = move(s[1])
            moved.append(("disc", c) + s[2:])
            if s[1].imag <= cut:
                xs += [c.real - s[2], c.real + s[2]]
                ys += [c.imag - s[2], c.imag + s[2]]
        else:
            pts = [move(z) for z in s[1]]
            moved.append((s[0], pts) + s[2:])
            xs += [m.real for z, m in zip(s[1], pts) if z.imag <= cut]
            ys += [m.imag for z, m in zip(s[1], pts) if z.imag <= cut]
    x0, x1, y0, y1 = min(xs) - pad, max(xs) + pad, min(ys) - pad, max(ys) + pad
    side = 0.875 * min(w, h)  # what survives the evaluation center crop
    scale = float(rng.uniform(*SCALE_RANGE)) * side / max(x1 - x0, y1 - y0, 1e-6)
    slack_x = min(MAX_SHIFT * side, max(0.0, side * 0.92 - (x1 - x0) * scale) / 2)
    slack_y = min(MAX_SHIFT * side, max(0.0, side * 0.92 - (y1 - y0) * scale) / 2)
    cx = w / 2 + float(rng.uniform(-slack_x, slack_x))
    cy = h / 2 + float(rng.uniform(-slack_y, slack_y))
    shift = complex(cx, cy) - scale * complex((x0 + x1) / 2, (y0 + y1) / 2)
    placed: list[Shape] = []
    for s in moved:
        if s[0] == "disc":
            placed.append(("disc", s[1] * scale + shift, s[2] * scale) + s[3:])
        else:
            placed.append((s[0], [z * scale + shift for z in s[1]]) + s[2:])
    return placed, scale


def _draw(img: Image.Image, shapes: list[Shape], palette: Palette, width_px: float) -> None:
    """Draw transformed shapes; line widths are multiples of `width_px`."""
    draw = ImageDraw.Draw(img)
    for s in shapes:
        if s[0] == "line":
            pts, wid, colour = s[1], max(1, round(s[2] * width_px)), palette[s[3]]
            draw.line([(z.real, z.imag) for z in pts], fill=colour, width=wid, joint="curve")
            rad = wid / 2
            for z in (pts[0], pts[-1]):
                draw.ellipse([z.real - rad, z.imag - rad, z.real + rad, z.imag + rad], fill=colour)
        elif s[0] == "disc":
            c, r, fill, outline = s[1], s[2], s[3], s[4]
            draw.ellipse(
                [c.real - r, c.imag - r, c.real + r, c.imag + r],
                fill=None if fill == "none" else palette[fill],
                outline=palette[outline],
                width=max(1, round(0.8 * width_px)),
            )
        else:
            outline = None if s[3] is None else palette[s[3]]
            draw.polygon(
                [(z.real, z.imag) for z in s[1]],
                fill=palette[s[2]],
                outline=outline,
                width=max(1, round(0.3 * width_px)),
            )


def _pick_framing(label: int, rng: np.random.Generator) -> float:
    """Draw a framing for the class and return its cut (see FRAMING_CUT)."""
    return FRAMING_CUT[int(rng.choice(3, p=FRAMING[CLASS_NAMES[label]]))]


def render(label: int, rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """Draw one RGB image of class `label` at `size` = (width, height), all randomness from `rng`."""
    w, h = size
    img = _background(rng, w, h, _pick_setting(label, rng))
    width = float(rng.uniform(0.09, 0.12))  # line width in figure units; the widest lines are 1.4 times this
    shapes, scale = _transform(SCENES[label](rng), rng, w, h, _pick_framing(label, rng), pad=0.7 * width)
    _draw(img, shapes, _palette(rng), width * scale)
    if rng.random() < BLUR_FRACTION:
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.0))))
    arr = np.asarray(img, dtype=np.float32) + float(rng.uniform(0, MAX_NOISE_STD)) * rng.standard_normal(
        (h, w, 3), dtype=np.float32
    )
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


# --------------------------------------------------------------------------------------------- dataset on disk


def _image_size(rng: np.random.Generator) -> tuple[int, int]:
    """Random (width, height) with width 96-320, height 80-288 and aspect ratio 0.5-2.5."""
    while True:
        w = int(rng.integers(96, 321))
        aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.5)))
        h = round(w / aspect)
        if 80 <= h <= 288:
            return w, h


def _duplicate_plan(images_per_class: int, seed: int, label: int) -> dict[int, int]:
    """Which sample indices of a class are byte copies, mapped to the index they copy."""
    if images_per_class < 2:
        return {}
    rng = np.random.default_rng([seed, label, images_per_class, 1])
    count = max(1, round(DUPLICATE_FRACTION * images_per_class))
    copies = rng.choice(np.arange(1, images_per_class), size=min(count, images_per_class - 1), replace=False)
    plan = {}
    for i in sorted(int(c) for c in copies):
        sources = [j for j in range(i) if j not in plan]
        plan[i] = int(rng.choice(sources))
    return plan


def _write_one(folder: Path, name: str, label: int, index: int, seed: int) -> Path:
    """Render sample (label, index) and save it as JPEG (varied quality) or PNG; returns the path."""
    rng = np.random.default_rng([seed, label, index, 0])
    size = _image_size(rng)
    as_png = rng.random() < PNG_FRACTION
    quality = int(rng.integers(60, 96))
    img = render(label, rng, size)
    path = folder / f"{name}_{index:04d}.{'png' if as_png else 'jpg'}"
    if as_png:
        img.save(path, format="PNG")
    else:
        img.save(path, format="JPEG", quality=quality)
    return path


def _expected_manifest(images_per_class: int, seed: int) -> dict:
    """The content of _generated.json for a complete set."""
    return {
        "generator_version": GENERATOR_VERSION,
        "images_per_class": images_per_class,
        "seed": seed,
        "classes": list(CLASS_NAMES),
    }


def _is_complete(root: Path, images_per_class: int, seed: int) -> bool:
    """True if root holds a finished set for these parameters (manifest matches and every file exists)."""
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if {k: manifest.get(k) for k in ("generator_version", "images_per_class", "seed", "classes")} != _expected_manifest(
        images_per_class, seed
    ):
        return False
    return all((root / rel).is_file() for rel in manifest.get("files", [])) and len(
        manifest.get("files", [])
    ) == images_per_class * len(CLASS_NAMES)


def write_image_folder(root: str | Path, images_per_class: int, seed: int = 0) -> Path:
    """Write root/<class>/<class>_<i:04d>.jpg|png for all classes; no-op if the same set is already there."""
    if images_per_class < 1 or seed < 0:
        raise ValueError("images_per_class must be >= 1 and seed >= 0")
    root = Path(root)
    if _is_complete(root, images_per_class, seed):
        return root
    (root / MANIFEST).unlink(missing_ok=True)
    files: list[str] = []
    for label, name in enumerate(CLASS_NAMES):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        plan = _duplicate_plan(images_per_class, seed, label)
        written: dict[int, Path] = {}
        for i in range(images_per_class):
            if i in plan:
                source = written[plan[i]]
                written[i] = folder / f"{name}_{i:04d}{source.suffix}"
                shutil.copyfile(source, written[i])
            else:
                written[i] = _write_one(folder, name, label, i, seed)
        keep = set(written.values())
        for old in folder.iterdir():  # leftovers of an earlier, different set
            if old not in keep and re.fullmatch(rf"{re.escape(name)}_\d{{4}}\.(jpg|png)", old.name):
                old.unlink()
        files += [f"{name}/{written[i].name}" for i in range(images_per_class)]
    manifest = _expected_manifest(images_per_class, seed) | {"files": files}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return root
