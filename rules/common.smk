# Everything that is not a rule: configuration-derived constants, wildcard
# constraints, the (cached) inventory and calibration plan, path helpers and
# the input functions of the rules in rules/*.smk.

import datetime
import functools
import json
import os
import shlex
from types import SimpleNamespace

import pandas as pd
from snakemake.exceptions import WorkflowError

from surveyred.calib import plan_calibrations
from surveyred.errors import SurveyredError
from surveyred.ingest import find_raw_files
from surveyred.instrument import load_instrument

# -- configuration -------------------------------------------------------------------

RESULTS = config["results_dir"]
RAW_DIR = config["raw_dir"]
INSTRUMENT_ARG = config["instrument"]  # passed to every command as given

try:
    INSTRUMENT = load_instrument(INSTRUMENT_ARG)
except SurveyredError as exc:
    raise WorkflowError(f"config 'instrument': {exc}") from exc

if config["detectors"] is None:
    DETECTORS = [det.id for det in INSTRUMENT.good_detectors]
else:
    DETECTORS = [int(d) for d in config["detectors"]]
    _unknown = sorted(set(DETECTORS) - {det.id for det in INSTRUMENT.detectors})
    if _unknown:
        raise WorkflowError(
            f"config 'detectors': {_unknown} are not detectors of instrument {INSTRUMENT.name}"
        )
if not DETECTORS:
    raise WorkflowError(f"instrument {INSTRUMENT.name}: no detectors to process")
DETECTOR_LIST = ",".join(str(d) for d in DETECTORS)

CALIB_CONFIG_JSON = json.dumps(config["calib"], sort_keys=True)
ISR_CONFIG_JSON = json.dumps(
    {"isr": config["isr"], "calib": config["calib"]}, sort_keys=True
)

# The conda environment (envs/surveyred.yaml) installs this checkout of surveyred
# in its post-deploy script, which finds it through this variable.
os.environ.setdefault("SURVEYRED_SRC", str(workflow.basedir))


# -- wildcards -------------------------------------------------------------------------


wildcard_constraints:
    night=r"\d{8}",
    visit=r"[A-Za-z0-9_.-]+",
    bgroup=r"[A-Za-z0-9_-]+",
    fgroup=r"[A-Za-z0-9_-]+",
    band=r"[A-Za-z0-9_-]+",


# -- paths -----------------------------------------------------------------------------

INVENTORY = os.path.join(RESULTS, "inventory.parquet")
REJECTS = os.path.join(RESULTS, "inventory_rejects.parquet")
# Pixel rules run one job per visit (or calibration group) and write one file per
# detector into one directory per job: Snakemake tracks the directory, so a
# survey-scale DAG has a few edges per job instead of a few per CCD (README,
# "Why one job per exposure"). The files inside are named by these patterns.
BIAS_DIR = os.path.join(RESULTS, "calib", "bias", "{bgroup}")
FLAT_DIR = os.path.join(RESULTS, "calib", "flat", "{fgroup}", "{band}")
CALEXP_DIR = os.path.join(RESULTS, "calexp", "{night}", "{visit}")
BIAS_FILE = "bias_{det}.fits"
FLAT_FILE = "flat_{det}.fits"
VISIT_FITS = "{visit}_{det}.fits"
VISIT_PARQUET = "{visit}_{det}.parquet"
LOGS = os.path.join(RESULTS, "logs")
BENCHMARKS = os.path.join(RESULTS, "benchmarks")


def bias_dir(group):
    """Directory of the master biases of a validity group."""
    return BIAS_DIR.format(bgroup=group)


def flat_dir(group, band):
    """Directory of the master flats of a validity group and band."""
    return FLAT_DIR.format(fgroup=group, band=band)


def calexp_dir(night, visit):
    return CALEXP_DIR.format(night=night, visit=visit)


def per_detector(directory, name, visit=None):
    """The per-detector files ``name`` (e.g. VISIT_FITS) inside a job's directory."""
    return [
        os.path.join(directory, name.format(visit=visit, det=det)) for det in DETECTORS
    ]


def visit_files(pattern, name):
    """Params function: a visit's per-detector files inside directory ``pattern``."""
    return lambda wildcards: per_detector(
        pattern.format(night=wildcards.night, visit=wildcards.visit),
        name,
        wildcards.visit,
    )


def science_visits():
    """Sorted ``[(night, visit)]`` of the science exposures in the inventory."""
    return sorted(calib_plan()[1])


# -- raw files, inventory and calibration plan -------------------------------------

# The raw frames are the inputs of the ingest checkpoint: adding or removing a
# file changes that set, and Snakemake's "input" rerun trigger re-runs ingest.
# Listing the directory costs well under a second even for 10^5 files. Paths
# with braces would be read as wildcards: ingest rejects them, so they are left
# out here.
RAW_FILES = [p for p in find_raw_files(RAW_DIR) if "{" not in p and "}" not in p]


def raw_files(wildcards):
    """Input function (returned paths are not parsed for wildcards)."""
    return RAW_FILES


@functools.lru_cache(maxsize=4)
def _read_inventory(path, mtime_ns, size):
    return pd.read_parquet(path)


@functools.lru_cache(maxsize=4)
def _calib_plan(path, mtime_ns, size, validity_json):
    inventory = _read_inventory(path, mtime_ns, size)
    plan = plan_calibrations(inventory, json.loads(validity_json))
    science = {
        (str(row.night), str(row.visit)): row
        for row in plan.science.itertuples(index=False)
    }
    return plan, science


def _inventory_key():
    # Through the checkpoint: until ingest has run (or while it must re-run)
    # this raises and Snakemake re-evaluates the DAG after ingest.  Pixel rules
    # therefore never list the inventory as an input: re-ingesting does not
    # re-run them, only new or changed exposures get jobs.
    path = checkpoints.ingest.get().output.inventory
    st = os.stat(path)
    return path, st.st_mtime_ns, st.st_size


def inventory():
    """The inventory (pandas.DataFrame), read once per version of the file."""
    return _read_inventory(*_inventory_key())


def calib_plan():
    """``(CalibPlan, {(night, visit): science row})`` for the current inventory."""
    validity = json.dumps(config["calib"]["validity"], sort_keys=True)
    return _calib_plan(*_inventory_key(), validity)


def science_row(wildcards):
    _, science = calib_plan()
    try:
        return science[(wildcards.night, wildcards.visit)]
    except KeyError:
        raise WorkflowError(
            f"visit {wildcards.visit} of night {wildcards.night} is not a science "
            f"exposure in {INVENTORY}"
        ) from None


# -- input functions and parameters ----------------------------------------------


def master_bias_raw(wildcards):
    plan, _ = calib_plan()
    try:
        return plan.bias_groups[wildcards.bgroup]
    except KeyError:
        raise WorkflowError(
            f"no bias group {wildcards.bgroup!r} in the calibration plan "
            f"(groups: {', '.join(plan.bias_groups) or 'none'})"
        ) from None


def _flat_key(wildcards):
    plan, _ = calib_plan()
    key = (wildcards.fgroup, wildcards.band)
    if key not in plan.flat_groups:
        known = ", ".join(f"{g}/{b}" for g, b in plan.flat_groups) or "none"
        raise WorkflowError(
            f"no flat group {wildcards.fgroup}/{wildcards.band} in the calibration "
            f"plan (groups: {known})"
        )
    return plan, key


def master_flat_inputs(wildcards):
    plan, key = _flat_key(wildcards)
    group = plan.flat_bias.get(key)
    return {
        "raw": plan.flat_groups[key],
        "bias": bias_dir(group) if group is not None else [],
    }


def master_flat_bias_dir(wildcards):
    plan, key = _flat_key(wildcards)
    group = plan.flat_bias.get(key)
    return bias_dir(group) if group is not None else "none"


def isr_inputs(wildcards):
    row = science_row(wildcards)
    return {
        "raw": row.path,
        "bias": bias_dir(row.bias_group) if _given(row.bias_group) else [],
        "flat": flat_dir(row.flat_group, row.band) if _given(row.flat_group) else [],
    }


def isr_band(wildcards):
    return science_row(wildcards).band


def isr_bias_dir(wildcards):
    row = science_row(wildcards)
    return bias_dir(row.bias_group) if _given(row.bias_group) else "none"


def isr_flat_dir(wildcards):
    row = science_row(wildcards)
    return flat_dir(row.flat_group, row.band) if _given(row.flat_group) else "none"


def _given(value):
    return value is not None and not (isinstance(value, float) and pd.isna(value))


def all_targets(wildcards):
    """The inventory and every master calibration (one path per job)."""
    plan, _ = calib_plan()
    return (
        [INVENTORY, REJECTS]
        + [bias_dir(group) for group in sorted(plan.bias_groups)]
        + [flat_dir(group, band) for group, band in sorted(plan.flat_groups)]
    )


# -- resources ---------------------------------------------------------------------
# Sized for the SimCam demo (4 detectors of 528x560); scaled by the attempt so that
# a job killed for memory or time gets more on its retry (--retries N).


def mem_mb(base):
    return lambda wildcards, attempt: base * attempt


def runtime_min(base):
    return lambda wildcards, attempt: base * attempt


# -- skymap: tracts, patches and the exposures of each coadd ------------------------
# Computed from the inventory (header-WCS corners, surveyred.footprint) when the DAG
# is built, so a coadd job depends only on the exposures that overlap its patch.

EXCLUDED_VISITS = {str(v) for v in config["exclude_visits"]}
EPOCH = datetime.date(2000, 1, 1)
SKYMAP_JSON = json.dumps(
    {
        k: config["skymap"][k]
        for k in ("pixel_scale", "patch_size", "patch_overlap", "n_patches")
    },
    sort_keys=True,
)


def _excluded(night, visit):
    return visit in EXCLUDED_VISITS or f"{night}/{visit}" in EXCLUDED_VISITS


@functools.lru_cache(maxsize=4)
def _sky_index(path, mtime_ns, size, skymap_json, pinned_json, margin, nights_per_job):
    from surveyred.footprint import field_tracts, skymap_config, visit_patches

    inv = _read_inventory(path, mtime_ns, size)
    science = inv[inv["obstype"] == "science"]
    try:
        tracts = field_tracts(
            science, skymap_config(json.loads(skymap_json)), json.loads(pinned_json)
        )
    except SurveyredError as exc:
        raise WorkflowError(f"config 'skymap': {exc}") from exc
    patches = visit_patches(science, tracts, margin_arcsec=margin)
    band = {
        (str(n), str(v)): str(b)
        for n, v, b in zip(science["night"], science["visit"], science["band"])
    }
    coadds = {}  # (tract, patch, band) -> [(night, visit)]
    for key, (tract, pids) in sorted(patches.items()):
        if _excluded(*key):
            continue
        for pid in pids:
            coadds.setdefault((str(tract), pid, band[key]), []).append(key)
    coadded = {(t, p) for t, p, _ in coadds}
    # (night, visit) -> the coadded patches it touches, i.e. its forced-photometry objects
    objects = {
        key: [(str(tract), p) for p in pids if (str(tract), p) in coadded]
        for key, (tract, pids) in patches.items()
    }
    forced = [k for k in sorted(patches) if not _excluded(*k) and objects[k]]
    batches = {}  # forced-photometry job -> [(night, visit)]
    for night, visit in forced:
        batches.setdefault(forced_batch(night, nights_per_job), []).append(
            (night, visit)
        )
    return SimpleNamespace(
        tracts={str(t.id): t for t in tracts.values()},
        patches=patches,
        coadds=coadds,
        objects=objects,
        forced=forced,
        batches=batches,
    )


def sky_index():
    """Tracts, patches per visit, visits per coadd and the forced-photometry plan."""
    return _sky_index(
        *_inventory_key(),
        SKYMAP_JSON,
        json.dumps(config["skymap"]["tracts"], sort_keys=True),
        float(config["skymap"]["footprint_margin_arcsec"]),
        int(config["forced"]["nights_per_job"]),
    )


def coadd_keys():
    """Sorted ``[(tract, patch, band)]`` of the coadds to build."""
    return sorted(sky_index().coadds)


def patch_keys():
    """Sorted ``[(tract, patch)]`` with at least one coadd."""
    return sorted({(t, p) for t, p, _ in coadd_keys()})


def tract_json(tract):
    t = sky_index().tracts[str(tract)]
    return json.dumps({"id": t.id, "ra": t.ra, "dec": t.dec}, sort_keys=True)


def visit_tract_patches(wildcards):
    """``(tract, [patch])`` of a visit (from its header-WCS footprint)."""
    return sky_index().patches.get((wildcards.night, wildcards.visit), (None, []))


def coadd_visits(wildcards):
    key = (wildcards.tract, wildcards.patch, wildcards.band)
    try:
        return sky_index().coadds[key]
    except KeyError:
        raise WorkflowError(
            f"no exposure of band {wildcards.band} touches patch {wildcards.patch} of "
            f"tract {wildcards.tract}"
        ) from None


def forced_visits():
    """Science visits measured by forced photometry: not excluded, on a coadded patch."""
    return sky_index().forced


def forced_batch(night, nights_per_job):
    """The forced-photometry job of a night: the first night of its calendar window.

    Windows of ``forced.nights_per_job`` days are anchored at 2000-01-01, so adding
    nights never moves the other nights to another job.
    """
    if nights_per_job <= 1:
        return night
    day = (datetime.date(int(night[:4]), int(night[4:6]), int(night[6:])) - EPOCH).days
    return (EPOCH + datetime.timedelta(days=day - day % nights_per_job)).strftime(
        "%Y%m%d"
    )


def forced_batches():
    return sorted(sky_index().batches)


def forced_file(night, visit):
    """The forced-photometry table of a visit."""
    batch = forced_batch(night, int(config["forced"]["nights_per_job"]))
    return os.path.join(FORCED_DIR.format(fbatch=batch), f"{visit}.parquet")


def batch_visits(wildcards):
    """``[(night, visit)]`` measured by the forced-photometry job ``wildcards.fbatch``."""
    return sky_index().batches.get(wildcards.fbatch, [])


def batch_dirs(wildcards, pattern):
    return [pattern.format(night=n, visit=v) for n, v in batch_visits(wildcards)]


def visit_objects(night, visit):
    """The coadd catalogs of the coadded patches a visit touches."""
    return sky_index().objects[(night, visit)]


def batch_patches(wildcards):
    return sorted(
        {tp for n, v in batch_visits(wildcards) for tp in visit_objects(n, v)}
    )


def forced_script(wildcards, input, outdir, threads, cfg):
    """Shell commands of one forced-photometry job: one surveyred call per visit.

    Each call logs to logs/forced_photometry/{night}/{visit}.log, like the
    per-visit rules; the first failure stops the job (set -e).
    """
    q = shlex.quote
    lines = ["set -euo pipefail", f"mkdir -p {q(outdir)}"]
    given = (
        list(input.positions)
        if not isinstance(input.positions, str)
        else [input.positions]
    )
    positions = f" --positions {q(given[0])}" if given else ""
    for night, visit in batch_visits(wildcards):
        logdir = os.path.join(LOGS, "forced_photometry", night)
        lines.append(f"mkdir -p {q(logdir)}")
        files = {
            kind: " ".join(
                q(f)
                for f in per_detector(
                    pattern.format(night=night, visit=visit), name, visit
                )
            )
            for kind, pattern, name in (
                ("calexp", CALEXP_DIR, VISIT_FITS),
                ("wcs", CALWCS_DIR, VISIT_FITS),
                ("psf", PSF_DIR, VISIT_FITS),
            )
        }
        objects = " ".join(
            q(COADD_CAT.format(tract=t, patch=p))
            for t, p in visit_objects(night, visit)
        )
        lines.append(
            f"surveyred forced-phot --calexp {files['calexp']} --wcs {files['wcs']}"
            f" --psf {files['psf']} --objects {objects}{positions}"
            f" --output {q(os.path.join(outdir, visit + '.parquet'))}"
            f" --config-json {q(cfg)} --threads {threads}"
            f" --log {q(os.path.join(logdir, visit + '.log'))}"
        )
    return "\n".join(lines)
