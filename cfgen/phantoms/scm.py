"""A small structural causal model (SCM) of the phantom chest X-ray population (DESIGN.md §3).

Every subject is a fixed draw of exogenous noise U from `numpy.random.default_rng([seed, index])`; the attributes are
deterministic mechanisms of their parents and U. Keeping U makes counterfactuals exact (Pearl's abduction, action,
prediction): `intervene` keeps all of U, sets the intervened attributes and recomputes every other attribute from its
mechanism, so only descendants of the intervened attributes can change.

Causal graph (every node also has its own exogenous noise)::

    sex      age
     |  \\   / |  \\
     |  smoking |   cardiomegaly
     |          |
     |   U_sev -+-> pleural_effusion            (U_sev: latent acuity, e.g. an inpatient stay)
     |          \\-> support_devices  (only in the confounded stratum, chosen by an exogenous coin U_conf)

Effusion and support devices are correlated because they share causes (acuity, age and the effusion noise), not
because one causes the other: in the confounded stratum the device is placed by the same process that produces the
effusion, so `do(pleural_effusion=1)` leaves the device alone and `do(support_devices=0)` leaves the effusion alone.
This is the spurious correlation a counterfactual method must not learn as a causal effect.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from statistics import NormalDist
from typing import TYPE_CHECKING, Any

import numpy as np

from cfgen.config import PHANTOM_ATTRIBUTES, PhantomConfig

if TYPE_CHECKING:  # render imports scm; the reverse import is only for annotations
    from cfgen.config import PhantomEffects

BINARY_ATTRIBUTES = ("smoking", "support_devices", "pleural_effusion", "cardiomegaly")
AGE_RANGE = (20, 90)
SEXES = ("F", "M")

# Population shape of the root and mechanism inputs; the prevalences come from the config.
_AGE_MEAN, _AGE_SD = 58.0, 15.0
_SMOKING_MALE, _SMOKING_AGE = 0.4, 0.3  # probit weights: men and older subjects smoke more often
_CARDIO_AGE = 0.8  # probit weight: the heart enlarges with age
_EFFUSION_AGE, _EFFUSION_NOISE = 0.5, 0.35  # acuity + age drive effusion; its own noise is small
_P_AP_VIEW = 0.3

_N_UNIFORM = 7 + len(PHANTOM_ATTRIBUTES)  # sex, coin, devices, view, split, effusion side, rib phase, missingness
_N_NORMAL = 24  # a few spare draws, so a new anatomical noise term does not reshuffle the others
_N_LUNG_SHAPE = 12  # 2 lungs x 3 harmonics x (cos, sin)


def subject_id(index: int) -> str:
    return f"PH{index:06d}"


@dataclass(frozen=True)
class ExogenousNoise:
    """U: everything random about a subject, fixed once drawn. Normals are N(0,1) z-scores, uniforms in [0, 1)."""

    # attribute mechanisms
    u_sex: float
    z_age: float
    z_smoking: float
    z_cardiomegaly: float
    z_severity: float  # latent acuity shared by effusion and, when confounded, the device
    z_effusion: float
    u_confounding: float  # the coin: below config.confounding, devices follow the effusion process
    u_devices: float
    # acquisition and bookkeeping
    u_view: float
    u_split: float
    u_missing: tuple[float, ...]
    # anatomy, read by the renderer
    body_width: float
    lung_width: float
    lung_height: float
    lung_apex: float
    lung_shape: tuple[float, ...]
    rib_phase: float
    rib_spacing: float
    heart_x: float
    heart_y: float
    heart_size: float
    device_x: float
    device_y: float
    lead_bend: float
    u_effusion_side: float
    meniscus: float
    intensity_gain: float


@dataclass(frozen=True)
class Subject:
    """One phantom patient: exogenous noise plus the attribute values it implies (or that an intervention set)."""

    index: int
    subject_id: str
    noise_seed: int  # seeds the acquisition noise of the image, so counterfactuals share it
    noise: ExogenousNoise = field(repr=False)
    sex: str
    age: int
    smoking: int
    support_devices: int
    pleural_effusion: int
    cardiomegaly: int
    #: attributes fixed by do(); kept so that a second intervention does not undo the first
    interventions: tuple[tuple[str, Any], ...] = ()

    def attributes(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in PHANTOM_ATTRIBUTES}

    @property
    def view_position(self) -> str:
        """PA for most, AP (portable, bedside) for the rest; the renderer ignores it."""
        return "AP" if self.noise.u_view < _P_AP_VIEW else "PA"


def _threshold(prevalence: float, sd: float) -> float:
    """Threshold t with P(N(0, sd^2) > t) = prevalence (a probit mechanism that hits the marginal)."""
    if prevalence <= 0.0:
        return math.inf
    if prevalence >= 1.0:
        return -math.inf
    return sd * NormalDist().inv_cdf(1.0 - prevalence)


def _age_z(age: int) -> float:
    return (age - _AGE_MEAN) / _AGE_SD


class PhantomSCM:
    """The phantom population: draws subjects, applies interventions, renders factual and counterfactual images."""

    def __init__(self, config: PhantomConfig):
        if config.seed < 0:
            raise ValueError(f"phantom seed must be >= 0 (numpy SeedSequence), got {config.seed}")
        self.config = config
        prev = config.prevalence
        self._t_smoking = _threshold(prev.smoking, math.sqrt(1 + (_SMOKING_MALE / 2) ** 2 + _SMOKING_AGE**2))
        self._t_cardio = _threshold(prev.cardiomegaly, math.sqrt(1 + _CARDIO_AGE**2))
        self._t_effusion = _threshold(prev.pleural_effusion, math.sqrt(1 + _EFFUSION_AGE**2 + _EFFUSION_NOISE**2))

    # ----------------------------------------------------------------------------------------------------- sampling
    def _draw_noise(self, index: int) -> tuple[int, ExogenousNoise]:
        rng = np.random.default_rng([self.config.seed, index])
        noise_seed = int(rng.integers(0, 2**63 - 1))
        u = rng.random(_N_UNIFORM).tolist()
        z = rng.standard_normal(_N_NORMAL).tolist()
        lung_shape = tuple(rng.standard_normal(_N_LUNG_SHAPE).tolist())
        n_attr = len(PHANTOM_ATTRIBUTES)
        noise = ExogenousNoise(
            u_sex=u[0],
            u_confounding=u[1],
            u_devices=u[2],
            u_view=u[3],
            u_split=u[4],
            u_effusion_side=u[5],
            rib_phase=u[6],
            u_missing=tuple(u[7 : 7 + n_attr]),
            z_age=z[0],
            z_smoking=z[1],
            z_cardiomegaly=z[2],
            z_severity=z[3],
            z_effusion=z[4],
            body_width=z[5],
            lung_width=z[6],
            lung_height=z[7],
            lung_apex=z[8],
            rib_spacing=z[9],
            heart_x=z[10],
            heart_y=z[11],
            heart_size=z[12],
            device_x=z[13],
            device_y=z[14],
            lead_bend=z[15],
            meniscus=z[16],
            intensity_gain=z[17],
            lung_shape=lung_shape,
        )
        return noise_seed, noise

    def subject(self, index: int) -> Subject:
        """The subject at `index`: a pure function of (config.seed, index), whatever the data set size."""
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
            raise ValueError(f"subject index must be a non-negative int, got {index!r}")
        index = int(index)
        noise_seed, noise = self._draw_noise(index)
        attrs = self._solve(noise, {})
        return Subject(index=index, subject_id=subject_id(index), noise_seed=noise_seed, noise=noise, **attrs)

    def subjects(self, start: int = 0, stop: int | None = None):
        stop = self.config.n if stop is None else stop
        return (self.subject(i) for i in range(start, stop))

    # --------------------------------------------------------------------------------------------------- mechanisms
    def _effusion_process(self, age: int, u: ExogenousNoise) -> int:
        """Acuity (U_sev) and age produce effusion; the confounded device placement reuses this same process."""
        score = u.z_severity + _EFFUSION_AGE * _age_z(age) + _EFFUSION_NOISE * u.z_effusion
        return int(score > self._t_effusion)

    def _solve(self, u: ExogenousNoise, fixed: dict[str, Any]) -> dict[str, Any]:
        """Evaluate the mechanisms in topological order; attributes in `fixed` are held at their do() values."""
        v: dict[str, Any] = {}
        v["sex"] = fixed.get("sex", SEXES[int(u.u_sex >= 0.5)])
        lo, hi = AGE_RANGE
        v["age"] = fixed.get("age", int(min(hi, max(lo, round(_AGE_MEAN + _AGE_SD * u.z_age)))))
        male = 0.5 if v["sex"] == "M" else -0.5
        age_z = _age_z(v["age"])
        v["smoking"] = fixed.get(
            "smoking", int(_SMOKING_MALE * male + _SMOKING_AGE * age_z + u.z_smoking > self._t_smoking)
        )
        v["cardiomegaly"] = fixed.get("cardiomegaly", int(_CARDIO_AGE * age_z + u.z_cardiomegaly > self._t_cardio))
        v["pleural_effusion"] = fixed.get("pleural_effusion", self._effusion_process(v["age"], u))
        if "support_devices" in fixed:
            v["support_devices"] = fixed["support_devices"]
        elif u.u_confounding < self.config.confounding:
            v["support_devices"] = self._effusion_process(v["age"], u)
        else:
            v["support_devices"] = int(u.u_devices < self.config.prevalence.support_devices)
        return v

    # ------------------------------------------------------------------------------------------------ interventions
    def intervene(self, subject: Subject, intervention: dict[str, Any]) -> Subject:
        """The counterfactual subject under do(intervention): same U, intervened values, descendants recomputed."""
        fixed = dict(subject.interventions)
        fixed.update(_validate_intervention(intervention))
        attrs = self._solve(subject.noise, fixed)
        return replace(subject, interventions=tuple(sorted(fixed.items())), **attrs)

    def redraw(self, subject: Subject, fields: tuple[str, ...], donor: int) -> Subject:
        """`subject` with its exogenous noise `fields` replaced by those of the subject at index `donor` (a draw from
        the prior), attributes re-solved under its own interventions: how the truth's unseen noise is resampled."""
        _, other = self._draw_noise(int(donor))
        noise = replace(subject.noise, **{name: getattr(other, name) for name in fields})
        return replace(subject, noise=noise, **self._solve(noise, dict(subject.interventions)))

    def missing_mask(self, subject: Subject) -> dict[str, bool]:
        """Which metadata cells the manifest hides (missing completely at random); the image is never affected."""
        frac = self.config.missing_fraction
        return {name: u < frac for name, u in zip(PHANTOM_ATTRIBUTES, subject.noise.u_missing)}

    def split(self, subject: Subject) -> str:
        """Patient-level split from the subject's own noise, so a subject never moves when n changes."""
        return split_for(subject.noise.u_split, self.config.split_fractions)

    # ---------------------------------------------------------------------------------------------------- rendering
    def render(self, subject: Subject, size: int | None = None, effects: PhantomEffects | None = None):
        from cfgen.phantoms.render import render

        return render(subject, size or self.config.size, effects or self.config.effects)

    def render_regions(self, subject: Subject, size: int | None = None, effects: PhantomEffects | None = None):
        from cfgen.phantoms.render import render_regions

        return render_regions(subject, size or self.config.size, effects or self.config.effects)

    def render_counterfactual(self, subject: Subject, intervention: dict[str, Any], size: int | None = None):
        """The true counterfactual image and lung mask of `subject` under do(intervention)."""
        return self.render(self.intervene(subject, intervention), size)


def split_for(u: float, fractions: dict[str, float]) -> str:
    if not fractions or any(f < 0 for f in fractions.values()) or sum(fractions.values()) <= 0:
        raise ValueError(f"split_fractions must be non-negative with a positive sum, got {fractions}")
    total = sum(fractions.values())
    acc = 0.0
    for name, f in fractions.items():
        acc += f / total
        if u < acc:
            return name
    return name  # u within rounding of 1.0


def _validate_intervention(intervention: dict[str, Any]) -> dict[str, Any]:
    # the empty intervention is the null edit: its counterfactual is the factual image
    if not isinstance(intervention, dict):
        raise ValueError(f"an intervention is a dict attribute -> value, got {intervention!r}")
    clean: dict[str, Any] = {}
    for name, value in intervention.items():
        if name not in PHANTOM_ATTRIBUTES:
            raise ValueError(f"cannot intervene on {name!r}: phantom attributes are {', '.join(PHANTOM_ATTRIBUTES)}")
        if name == "sex":
            if value not in SEXES:
                raise ValueError(f"sex must be one of {SEXES}, got {value!r}")
            clean[name] = str(value)
        elif name == "age":
            ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
            if not ok or value != int(value) or not AGE_RANGE[0] <= value <= AGE_RANGE[1]:
                lo, hi = AGE_RANGE
                raise ValueError(f"age must be a whole number of years in {lo}..{hi}, got {value!r}")
            clean[name] = int(value)
        else:
            if isinstance(value, (float, np.floating)) and value in (0.0, 1.0):
                value = int(value)
            if not isinstance(value, (int, np.integer)) or value not in (0, 1):
                raise ValueError(f"{name} must be 0 or 1 (absent or present), got {value!r}")
            clean[name] = int(value)
    return clean
