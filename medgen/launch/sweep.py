"""Run a sweep (medgen/sweep.py): locally, point after point, or on SLURM as job arrays.

On SLURM: one prepare job; train, evaluate, generate and report as arrays of one element per point
(``--array=0-(n-1)%k``), each array after the one before element by element (``aftercorr``: point k's
evaluation starts when point k's training succeeded, whatever the other points do); then one compare job
``afterany`` of them all, so failed points never block it. Element i's submitit pickle (chosen by
SLURM_ARRAY_TASK_ID) names point i's config snapshot; requeue and resume per element are the single run's.
"""
from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import submitit

from medgen import atomic, config, sweep, tracking
from medgen.config import Config
from medgen.errors import UserError
from medgen.launch import local, records, slurm
from medgen.layout import SweepLayout

log = logging.getLogger("medgen")


# --------------------------------------------------------------------------- local


def run_local(base: Config) -> dict[str, Any]:
    """prepare once, every point's stages in turn (a failing point is recorded and the next one runs), compare."""
    pts = sweep.points(base)
    sweep.write_manifest(base, pts)
    tracking.open_sweep(base, sweep.flat_grid(base.sweep.grid))  # the points' parent run, where MLflow is on
    local.run_stage("prepare", base)
    outcome: dict[str, dict[str, Any]] = {}
    for p in pts:
        log.info("sweep: point %d/%d %s", p.index + 1, len(pts), p.name)
        outcome[p.name] = _run_point(p)
        atomic.write_text(SweepLayout(Path(base.run.dir)).local_status, json.dumps(outcome, indent=2))
    return local.run_stage("compare", base)


def _run_point(p: sweep.Point) -> dict[str, Any]:
    states: dict[str, Any] = {}
    for stage in sweep.POINT_STAGES:
        if states and states[list(states)[-1]]["state"] != "COMPLETED":
            states[stage] = {"state": "SKIPPED"}
            continue
        try:
            local.run_stage(stage, p.cfg)
            states[stage] = {"state": "COMPLETED"}
        except Exception as e:  # one point's failure must not stop the others
            log.error("sweep: point %s failed in %s: %s: %s", p.name, stage, type(e).__name__, e)
            states[stage] = {"state": "FAILED", "error": f"{type(e).__name__}: {e}"}
    return states


# --------------------------------------------------------------------------- SLURM


def _snapshots(base: Config, pts: list[sweep.Point], folder: Path) -> tuple[str, list[str]]:
    """The config every job reads, as it was at submission: the sweep's, and one per point."""
    (folder / "points").mkdir()
    path = folder / "config.yaml"
    path.write_text(config.dump_yaml(base), encoding="utf-8")
    out = []
    for p in pts:
        out.append(str(folder / "points" / f"{p.index}.yaml"))
        Path(out[-1]).write_text(config.dump_yaml(p.cfg), encoding="utf-8")
    return str(path), out


def _plans(base: Config, folder: Path) -> list[slurm.StagePlan]:
    return slurm.plan(base, folder, (*base.slurm.stages, "compare"))


def _dependency(plan: slurm.StagePlan, ids: dict[str, str], n: int) -> dict[str, str]:
    """compare: after every job, however it ended; the first array: after prepare succeeded; later arrays:
    element k after element k of the array before it succeeded (``ids``: stage -> job id, so far)."""
    if not ids:
        return {}
    if plan.stage == "compare":
        return {"dependency": "afterany:" + ":".join(ids.values())}
    prev_stage, prev = list(ids.items())[-1]
    corresponding = prev_stage != "prepare" and n > 1  # a one-point "array" is a plain job
    return {"dependency": ("aftercorr:" if corresponding else "afterok:") + prev}


def scripts(base: Config) -> list[tuple[str, str]]:
    """(stage, sbatch script) of every job of the sweep, job ids not known yet shown as placeholders."""
    n = len(sweep.points(base))
    folder = slurm.submission_folder(base)
    out, ids = [], {}
    for p in _plans(base, folder):
        array = {"map_count": n} if _is_array(p, n) else {}
        out.append((p.stage, slurm.script(p, folder, **array, **_dependency(p, ids, n))))
        ids[p.stage] = f"<{p.stage} job id>"
    return out


def submit(base: Config) -> dict[str, Any]:
    """Submit prepare, the arrays and compare; writes and returns <sweep dir>/slurm/jobs.json."""
    pts = sweep.points(base)
    folder = slurm.submission_folder(base)
    plans = _plans(base, folder)
    slurm.require_slurm()
    slurm.refuse_active_chain(base.run.dir)
    n, jobs = len(pts), {}
    with slurm.submission_env():
        for p in plans:
            slurm.test_only(p, folder, **({"map_count": n} if _is_array(p, n) else {}))
    with slurm.submission_env(), slurm.private_folder(folder):
        submitted = time.strftime("%Y-%m-%dT%H:%M:%S")
        base_path, point_paths = _snapshots(base, pts, folder)
        sweep.write_manifest(base, pts)
        tracking.open_sweep(base, sweep.flat_grid(base.sweep.grid))
        for p in plans:
            try:
                jobs[p.stage] = _submit_stage(p, folder, jobs, base.slurm.max_requeues, base_path, point_paths)
            except submitit.core.utils.FailedJobError as e:
                slurm.cancel([s["job_id"] for s in jobs.values()])
                raise UserError(f"sbatch refused the {p.stage} stage: {str(e).strip().splitlines()[-1]}") from None
    info = {"sweep": True, "submitted": submitted, "run_dir": str(Path(base.run.dir).absolute()),
            "folder": str(folder), "config": base_path, "points": n,
            "profile": str(slurm.profile_path(base.slurm.profile, base.slurm.profile_dir)), "stages": jobs}
    path = records.jobs_file(base.run.dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(path, json.dumps(info, indent=2))
    return info


def _is_array(p: slurm.StagePlan, n: int) -> bool:
    return p.stage in sweep.POINT_STAGES and n > 1


def _submit_stage(p: slurm.StagePlan, folder: Path, done: dict[str, Any], max_requeues: int, base_path: str,
                  point_paths: list[str]) -> dict[str, Any]:
    executor = slurm.Executor(folder=folder, max_num_timeout=max_requeues)
    executor.update_parameters(**p.params, **_dependency(p, {k: s["job_id"] for k, s in done.items()},
                                                         len(point_paths)))
    fn = slurm.job_callable(p.stage)
    if p.stage not in sweep.POINT_STAGES:
        job = executor.submit(fn, base_path, [])
        return {"job_id": job.job_id, "name": p.params["job_name"], "tasks": p.tasks,
                "logs": [str(folder / f"{job.job_id}_{t}_log.out") for t in range(p.tasks)]}
    # one element per point (submitit submits a single job, no array, for one point)
    elements = executor.map_array(fn, point_paths, [[]] * len(point_paths))
    return {"job_id": elements[0].job_id.split("_")[0], "name": p.params["job_name"], "tasks": p.tasks,
            "elements": [e.job_id for e in elements],
            "logs": [[str(folder / f"{e.job_id}_{t}_log.out") for t in range(p.tasks)] for e in elements]}


def describe(info: dict[str, Any]) -> str:
    """What ``medgen sweep --executor slurm`` prints."""
    stages, n = info["stages"], info["points"]
    lines = [f"submitted a sweep of {n} points (profile {info['profile']}): prepare once, then per point "
             f"{', '.join(s for s in stages if s in sweep.POINT_STAGES)} as job arrays, then compare:"]
    for name, s in stages.items():
        kind = f"array of {n}" if "elements" in s and n > 1 else "job"
        first = s["logs"][0][0] if "elements" in s else s["logs"][0]
        lines.append(f"  {name:<9} {kind:<12} {s['job_id']:<8} log {first}")
    ids = ",".join(s["job_id"] for s in stages.values())
    lines += [f"follow:  medgen status {info['run_dir']}", f"         squeue -j {ids}",
              f"cancel:  scancel {ids.replace(',', ' ')}",
              f"report:  {SweepLayout(Path(info['run_dir'])).comparison} (once compare ran)"]
    return "\n".join(lines)


# --------------------------------------------------------------------------- status


def _expand(jid: str) -> list[tuple[str, int]]:
    """sacct's ``123_4`` -> [(123, 4)]; a still-pending ``123_[2-5%2]`` -> every element it stands for."""
    m = re.fullmatch(r"(\d+)_(\d+)", jid)
    if m:
        return [(m.group(1), int(m.group(2)))]
    m = re.fullmatch(r"(\d+)_\[([\d,-]+)(%\d+)?\]", jid)
    if not m:
        return []
    out = []
    for part in m.group(2).split(","):
        lo, _, hi = part.partition("-")
        out += [(m.group(1), i) for i in range(int(lo), int(hi or lo) + 1)]
    return out


def _element_states(info: dict[str, Any]) -> dict[str, Any]:
    """job id or (array id, index) -> (state, exit code, elapsed)."""
    raw = slurm.job_states([s["job_id"] for s in info["stages"].values()], info["submitted"])
    out: dict[Any, Any] = dict(raw)
    # the array's own record (123_[0-3%4]) stands for the elements not split off yet; a split-off element's
    # record (123_2) is its own, so it wins
    for jid in sorted(raw, key=lambda j: "[" not in j):  # the arrays' own records first
        for key in _expand(jid):
            out[key] = raw[jid]
    return out


def _state_of(s: dict[str, Any], i: int, states: dict) -> tuple[str, str, str]:
    if "elements" not in s:
        return states.get(s["job_id"], ("UNKNOWN", "", ""))
    eid = s["elements"][i]
    return states.get(eid) or states.get(_key(eid)) or ("PENDING", "", "")


def _key(eid: str) -> tuple[str, int]:
    a, _, i = eid.partition("_")
    return a, int(i or 0)


def status(sweep_dir: str) -> tuple[str, int]:
    """Per point and stage: SLURM states (jobs.json) or a local sweep's outcomes; exit code 1 if any failed."""
    manifest = sweep.read_manifest(sweep_dir)
    info = records.sweep_jobs(sweep_dir)
    if info:
        return _slurm_status(sweep_dir, manifest, info)
    local_path = SweepLayout(Path(sweep_dir)).local_status
    if not local_path.exists():
        raise UserError(f"{sweep_dir}: a sweep, but neither {records.jobs_file(sweep_dir)} nor {local_path}: "
                        "no point has run yet")
    return _local_status(sweep_dir, manifest, json.loads(local_path.read_text()))


def _table(manifest: dict, cell) -> list[str]:
    width = max(len(p["name"]) for p in manifest["points"]) + 2
    lines = [f"  {'point':<{width}}" + "".join(f"{s:<13}" for s in sweep.POINT_STAGES)]
    for p in manifest["points"]:
        lines.append(f"  {p['name']:<{width}}" + "".join(f"{cell(p, s):<13}" for s in sweep.POINT_STAGES))
    return lines


def _local_status(sweep_dir: str, manifest: dict, outcome: dict) -> tuple[str, int]:
    lines = [f"{sweep_dir}: local sweep of {len(manifest['points'])} points"]
    lines += _table(manifest, lambda p, s: outcome.get(p["name"], {}).get(s, {}).get("state", "-"))
    failed = [(p, s, r) for p in manifest["points"] for s, r in outcome.get(p["name"], {}).items()
              if r["state"] == "FAILED"]
    lines += [f"point {p['name']} failed in {s}: {r.get('error', '')}" for p, s, r in failed]
    return "\n".join(lines), 1 if failed else 0


def _slurm_status(sweep_dir: str, manifest: dict, info: dict) -> tuple[str, int]:
    stages, states = info["stages"], _element_states(info)
    lines = [f"{sweep_dir}: SLURM sweep of {info['points']} points submitted {info['submitted']}"]
    if "prepare" in stages:
        p = stages["prepare"]
        lines.append(f"  prepare  job {p['job_id']:<8} {_state_of(p, 0, states)[0]:<13} log {p['logs'][0]}")
    lines += _table(manifest, lambda p, s: _state_of(stages[s], p["index"], states)[0] if s in stages else "-")
    bad = 0
    for p in manifest["points"]:
        for s in (x for x in sweep.POINT_STAGES if x in stages):
            state, code, _ = _state_of(stages[s], p["index"], states)
            if state in slurm.FAILED:
                log_path = records.failed_log(stages[s]["logs"][p["index"]])
                lines.append(f"point {p['name']}: {s} failed ({state}, SLURM exit code {code}): see {log_path}")
                if error := records.error_line(log_path):
                    lines.append(f"  {error}")
                bad += 1
            elif state == "CANCELLED":
                bad += 1
    if "compare" in stages:
        c = stages["compare"]
        state = _state_of(c, 0, states)[0]
        lines.append(f"  compare  job {c['job_id']:<8} {state:<13} report {SweepLayout(Path(sweep_dir)).comparison}")
        bad += state in slurm.FAILED or state == "CANCELLED"
    return "\n".join(lines), 1 if bad else 0
