"""The pipeline on SLURM through submitit: one job per stage, chained with ``afterok`` dependencies.

- ``submit(cfg)`` (``medgen run --executor slurm``) submits the chain and returns at once; it writes
  ``<run.dir>/slurm/jobs.json`` (stage -> job id, log files) for ``status(run_dir)`` (``medgen status``).
- ``scripts(cfg)`` (``--dry-run``) renders the sbatch scripts without submitting anything.
- ``StageJob`` is what every SLURM task unpickles and calls; ``jobs/<stage>.py`` subclass it.

train, evaluate and generate run one SLURM task per GPU (per CPU rank with gloo when the profile has no
GPU), on one node or several, with the torch.distributed variables exported from SLURM's: torchrun is
never nested inside srun. Preemption and time limits reach the job as USR2: train checkpoints at the next
step boundary, then submitit's handler requeues the job, and the rerun resumes from the checkpoint.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, NoReturn, Sequence

import submitit
import yaml

import medgen
from medgen import atomic, config
from medgen.config import Config, opt
from medgen.config.schema import field_problems
from medgen.errors import ConfigError, TryAgain, UserError
from medgen.launch.records import error_line, failed_log, jobs_file, log_cell, read_jobs
from medgen.logs import logging_for

log = logging.getLogger("medgen")

# Run from a source checkout, jobs/ and slurm/profiles/ are read there, and the jobs must import ITS medgen
# (an editable install elsewhere would otherwise win), so it goes first on the jobs' PYTHONPATH. Installed from
# the wheel, the same files are the packages medgen.jobs and medgen.profiles (pyproject.toml's package-dir).
_TOP = Path(medgen.__file__).resolve().parents[1]
CHECKOUT = _TOP if (_TOP / "pyproject.toml").is_file() and (_TOP / "jobs").is_dir() else None
PROFILES = CHECKOUT / "slurm" / "profiles" if CHECKOUT else Path(medgen.__file__).resolve().parent / "profiles"
JOBS_PACKAGE = "jobs" if CHECKOUT else "medgen.jobs"
DISTRIBUTED = ("train", "evaluate", "generate")
REQUEUE_WAIT_S = 300  # how long non-zero ranks wait for rank 0 to requeue the job before giving up
# A requeued job numbers its steps from 0 again. A step signal slurmctld could not deliver because a node was not
# responding (e.g. srun --kill-on-bad-exit cancelling step N.0 after that node died, before it was marked DOWN)
# stays queued and is retried every 60 s until the node answers or is DOWN: a node back by then gets it, and it
# hits the requeued job's step N.0 (SIGCONT+SIGTERM, SIGKILL KillWait later), stopping or failing the resumed run.
# One short step per earlier run moves this run's srun past every step number an earlier run used.
SKIP_OLD_STEP_IDS = ('for _ in $(seq "${SLURM_RESTART_COUNT:-0}"); do '
                     'srun --nodes=1 --ntasks=1 true >/dev/null 2>&1 || true; done')
# which cluster sbatch, sacct, scancel and the jobs talk to (a site or host with several selects one by these)
CLUSTER_SELECTION = ("SLURM_CONF", "SLURM_CLUSTERS")
FAILED = {"FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}

# Every value that reaches an sbatch script matches one of these: no whitespace, quotes, '$' or newline
# (an #SBATCH line is a shell comment, so a newline in a value would start a shell command).
NAMES = re.compile(r"[A-Za-z0-9_.-]+(,[A-Za-z0-9_.-]+)*")  # partition, account, qos (lists too)
CONSTRAINT = re.compile(r"[A-Za-z0-9_.,&|\[\]*()!:-]+")  # sbatch --constraint syntax
PATH = re.compile(r"/[A-Za-z0-9_./+@=,:~-]*")  # no '%' either: sbatch expands %j etc. in log paths
OPTION = re.compile(r"[a-z][a-z0-9-]*")
VALUE = re.compile(r"[A-Za-z0-9_.,:=@/+-]+")
# set by medgen itself (or by a profile field): an extra option would silently fight them
MANAGED = {"job-name", "output", "error", "open-mode", "dependency", "kill-on-invalid-dep", "signal", "chdir",
           "requeue", "array", "nodes", "ntasks-per-node", "cpus-per-task", "gpus-per-node", "mem", "time",
           "partition", "account", "qos", "constraint", "wrap"}


@dataclass
class Profile:
    """A cluster profile (slurm/profiles/*.yaml)."""

    partition: str = opt("", "Partition ('' = the cluster's default).")
    account: str = opt("", "Account to charge ('' = your default).")
    qos: str = opt("", "Quality of service ('' = the default).")
    gpus_per_node: int = opt(0, "GPUs per node for train/evaluate/generate, which run one task per GPU.", ge=0)
    tasks_per_node: int = opt(1, "Tasks per node for train/evaluate/generate when gpus_per_node is 0 (gloo).", ge=1)
    cpus_per_task: int = opt(1, "CPU cores per task.", ge=1)
    mem_gb: float = opt(0.0, "Memory per node in GB (0 = the cluster's default).", ge=0)
    timeout_min: int = opt(60, "Time limit of each stage's job in minutes (slurm.timeout_min overrides).", ge=1)
    constraint: str = opt("", "Node features (--constraint), e.g. h100.")
    nodes: int = opt(1, "Nodes for train/evaluate/generate (slurm.nodes overrides).", ge=1)
    min_nodes: int = opt(0, "Start train/evaluate/generate on as few as this many nodes when no more are free "
                         "(sbatch --nodes=min-max; 0 = all of them; slurm.min_nodes overrides).", ge=0)
    array_parallelism: int = opt(4, "Sweeps: grid points running at once per stage (--array=...%k; "
                                 "slurm.array_parallelism overrides).", ge=1)
    sbatch: dict[str, Any] = opt({}, "Other sbatch options, e.g. {exclusive: true, mail-type: FAIL}.")


@dataclass
class StagePlan:
    stage: str
    tasks: int  # SLURM tasks in all (nodes x tasks per node); task t logs to <folder>/<job id>_<t>_log.out
    params: dict[str, Any]  # submitit SlurmExecutor parameters, without the dependency


# --------------------------------------------------------------------------- profiles and plans


def _profile_dirs(own: str) -> list[Path]:
    return [Path(own), PROFILES] if own else [PROFILES]


def profile_path(name: str, own: str = "") -> Path:
    """A bare name is a file in ``own`` (slurm.profile_dir) or among the built-in profiles; anything else a path."""
    if re.fullmatch(r"[A-Za-z0-9_-]+", name):
        found = [d / f"{name}.yaml" for d in _profile_dirs(own) if (d / f"{name}.yaml").is_file()]
        return found[0] if found else _profile_dirs(own)[0] / f"{name}.yaml"
    return Path(name)


def load_profile(name: str, own: str = "") -> Profile:
    path = profile_path(name, own)
    where = f"slurm.profile={name}"
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        known = ", ".join(sorted({p.stem for d in _profile_dirs(own) for p in d.glob("*.yaml")}))
        raise ConfigError([f"{where}: no such profile {path} (known: {known})"]) from None
    except yaml.YAMLError as e:
        raise ConfigError([f"{where}: {path} is not valid YAML ({str(e).splitlines()[0]})"]) from None
    problems: list[str] = []
    prof = config.build_dataclass(Profile, raw, f"{where}: ", problems)
    problems += [f"{where}: {p}" for p in _check_profile(prof)]
    if problems:
        raise ConfigError(problems)
    return prof


def _check_profile(p: Profile) -> list[str]:
    out = [f"{k}: {v!r} is not a valid name (letters, digits, _ . - and commas)"
           for k, v in (("partition", p.partition), ("account", p.account), ("qos", p.qos))
           if v and not NAMES.fullmatch(v)]
    if p.constraint and not CONSTRAINT.fullmatch(p.constraint):
        out.append(f"constraint: {p.constraint!r} has characters sbatch constraints never use")
    out += field_problems(p, "")
    for key, value in p.sbatch.items():
        if not isinstance(key, str) or not OPTION.fullmatch(key.replace("_", "-")):
            out.append(f"sbatch: {key!r} is not an sbatch option name")
        elif key.replace("_", "-") in MANAGED:
            out.append(f"sbatch: {key} is set by medgen or by a profile field; not allowed here")
        elif not (isinstance(value, bool) or (isinstance(value, int)) or
                  (isinstance(value, str) and VALUE.fullmatch(value))):
            out.append(f"sbatch: {key}={value!r}: values are true/false, integers or plain words (no spaces or quotes)")
    return out


def _checked_path(what: str, path: Path | str) -> str:
    text = str(path)
    if not PATH.fullmatch(text):
        raise UserError(f"{what} {text!r}: SLURM paths may hold only letters, digits and _ . / + @ = , : ~ -")
    return text


def stage_plan(stage: str, cfg: Config, prof: Profile) -> StagePlan:
    s = cfg.slurm
    distributed = stage in DISTRIBUTED
    nodes = (s.nodes or prof.nodes) if distributed else 1
    per_node = (prof.gpus_per_node or prof.tasks_per_node) if distributed else 1
    params: dict[str, Any] = {
        "job_name": "medgen-" + re.sub(r"[^A-Za-z0-9_.-]", "_", cfg.run.name) + "-" + stage,
        "time": s.timeout_min or prof.timeout_min,
        "nodes": nodes,
        "ntasks_per_node": per_node,
        "cpus_per_task": prof.cpus_per_task,
        "signal_delay_s": s.signal_delay_s,
        "stderr_to_stdout": True,  # one log per task
        # the job runs under the owner-only umask it was submitted with (its logs are private); the stage
        # itself writes its outputs under the submitting shell's umask (StageJob._run)
        "setup": [*_pythonpath(), f"export MEDGEN_UMASK={current_umask():04o}", SKIP_OLD_STEP_IDS,
                  # c10d's C++ warnings (rendezvous retries, IPv6 lookups) in every task's log; errors still show
                  "export TORCH_CPP_LOG_LEVEL=${TORCH_CPP_LOG_LEVEL:-ERROR}"],
        # used only when the stage is submitted as an array (a sweep): %k in --array=0-(n-1)%k
        "array_parallelism": s.array_parallelism or prof.array_parallelism,
        # a task that dies kills its step; the others would otherwise wait in a collective until a timeout
        "srun_args": ["--kill-on-bad-exit=1"],
        "additional_parameters": {
            "chdir": _checked_path("working directory", os.getcwd()),  # relative paths in the config
            "requeue": True,
            "kill-on-invalid-dep": "yes",  # a failed stage cancels its dependents instead of leaving them pending
            **{k.replace("_", "-"): v for k, v in prof.sbatch.items() if v is not False},
        },
    }
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(prof, key):
            params[key] = getattr(prof, key)
    least = (s.min_nodes or prof.min_nodes) if distributed else 0
    if least > nodes:
        raise UserError(f"slurm.min_nodes={least} is more than the {nodes} node(s) the {stage} stage asks for")
    if 0 < least < nodes:  # a requeued stage that lost a node goes on with the nodes it gets (medgen/elastic.py)
        # SLURM sets a job's task count from --ntasks-per-node x the range's minimum, and then allocates that
        # minimum: so the tasks per node go to srun (one step over every node allocated), and sbatch asks for
        # the CPUs those tasks need on each node (sbatch_text drops --ntasks-per-node from the header)
        params["additional_parameters"].update(nodes=f"{least}-{nodes}", mincpus=per_node * prof.cpus_per_task)
        params["srun_args"] = [*params["srun_args"], f"--ntasks-per-node={per_node}",
                               f"--cpus-per-task={prof.cpus_per_task}"]
    if distributed and prof.gpus_per_node:
        params["gpus_per_node"] = prof.gpus_per_node
    if prof.mem_gb:
        params["mem"] = f"{int(prof.mem_gb * 1024)}M"
    return StagePlan(stage, nodes * per_node, params)


def _pythonpath() -> list[str]:
    if not CHECKOUT:
        return []
    return [f"export PYTHONPATH={shlex.quote(_checked_path('checkout', CHECKOUT))}${{PYTHONPATH:+:$PYTHONPATH}}"]


def plan(cfg: Config, folder: Path, stages: Sequence[str] = ()) -> list[StagePlan]:
    """Validated sbatch parameters of every stage to submit (``stages``, default slurm.stages; ConfigError or
    UserError on any mistake)."""
    prof = load_profile(cfg.slurm.profile, cfg.slurm.profile_dir)
    limit_s = (cfg.slurm.timeout_min or prof.timeout_min) * 60
    if limit_s - cfg.slurm.signal_delay_s < 60:
        # the limit counts from every (re)start: USR2 due right after a start would hit every restart
        raise ConfigError([f"slurm.signal_delay_s: {cfg.slurm.signal_delay_s} s leaves under a minute of the "
                           f"{limit_s // 60}-minute time limit before USR2; lower it or raise slurm.timeout_min"])
    _checked_path("slurm.folder", folder)
    _checked_path("python", sys.executable)
    return [stage_plan(stage, cfg, prof) for stage in stages or cfg.slurm.stages]


def current_umask() -> int:
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def private_folder(folder: Path) -> Iterator[None]:
    """The submission folder, owner-only whatever the umask, and everything written while inside this block
    (submitit's pickles and scripts, the config snapshots; sbatch hands the umask on to the job, so its logs
    too). Compute nodes unpickle and run these files as the submitting user: nobody else may write them. An
    existing slurm.folder that others can write to is refused."""
    base = folder.parent
    if base.exists() and base.stat().st_mode & 0o022:
        raise UserError(f"slurm.folder {base}: group or others can write to it (mode {base.stat().st_mode & 0o777:o}), "
                        "and SLURM jobs run the pickles submitted into it; chmod go-w it, or choose another "
                        "slurm.folder")
    base.parent.mkdir(parents=True, exist_ok=True)
    mask = os.umask(0o077)
    try:
        for d in (base, folder):
            if not d.exists():
                d.mkdir()
                d.chmod(0o700)  # mkdir's mode is cut by the umask; chmod is not
        yield
    finally:
        os.umask(mask)


def submission_folder(cfg: Config) -> Path:
    # job ids restart at 1 on a rebuilt cluster: a fresh folder per submission keeps submitit from
    # mistaking an old job's result file for the new one's
    base = Path(cfg.slurm.folder or cfg.layout.slurm).absolute()
    return base / f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


# --------------------------------------------------------------------------- dry run and submission


def _command(folder: Path) -> str:
    # as submitit's SlurmExecutor writes it (built here too, so a dry run needs no srun on this machine)
    return f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(folder))}"


def scripts(cfg: Config) -> list[tuple[str, str]]:
    """(stage, sbatch script) for every stage, with placeholders for the job ids not known yet."""
    folder = submission_folder(cfg)
    out, prev = [], None
    for p in plan(cfg, folder):
        dep = {"dependency": f"afterok:<{prev} job id>"} if prev else {}
        out.append((p.stage, script(p, folder, **dep)))
        prev = p.stage
    return out


def script(p: StagePlan, folder: Path, **extra: Any) -> str:
    """The stage's sbatch script as Executor writes it."""
    return sbatch_text(_command(folder), folder, {**p.params, **extra})


def sbatch_text(command: str, folder: Path, params: dict[str, Any]) -> str:
    """submitit's sbatch script, without ``--ntasks-per-node`` when the nodes are a range (stage_plan)."""
    from submitit.slurm.slurm import _make_sbatch_string

    text = _make_sbatch_string(command=command, folder=folder, **params)
    if "-" in str(params.get("additional_parameters", {}).get("nodes", "")):
        text = "".join(line for line in text.splitlines(keepends=True)
                       if not line.startswith("#SBATCH --ntasks-per-node="))
    return text


class Executor(submitit.SlurmExecutor):
    """submitit's SlurmExecutor, writing its scripts with ``sbatch_text``."""

    def _make_submission_file_text(self, command: str, uid: str) -> str:
        return sbatch_text(command, self.folder, self.parameters)


def job_callable(stage: str) -> StageJob:
    """``jobs/<stage>.py``'s class, pickled by reference: the jobs import it as this process does (from the
    checkout, or from the installed package)."""
    if CHECKOUT and str(CHECKOUT) not in sys.path:
        sys.path.insert(0, str(CHECKOUT))
    return getattr(importlib.import_module(f"{JOBS_PACKAGE}.{stage}"), stage.capitalize())()


def submit(cfg: Config) -> dict[str, Any]:
    """Submit the chain; returns (and writes to jobs.json) stage -> job id and log files."""
    folder = submission_folder(cfg)
    plans = plan(cfg, folder)
    require_slurm()
    refuse_active_chain(cfg.run.dir)
    stages: dict[str, Any] = {}
    with submission_env():
        for p in plans:
            test_only(p, folder)
    with submission_env(), private_folder(folder):
        submitted = time.strftime("%Y-%m-%dT%H:%M:%S")  # before the first job: sacct -S in `medgen status`
        snapshot = folder / "config.yaml"  # every stage reads the config as it was at submission
        snapshot.write_text(config.dump_yaml(cfg), encoding="utf-8")
        for p in plans:
            try:
                job = _submit_one(p, folder, stages, cfg.slurm.max_requeues, str(snapshot))
            except submitit.core.utils.FailedJobError as e:
                cancel([s["job_id"] for s in stages.values()])
                raise UserError(f"sbatch refused the {p.stage} stage: {str(e).strip().splitlines()[-1]}") from None
            stages[p.stage] = {"job_id": job.job_id, "name": p.params["job_name"], "tasks": p.tasks,
                               "logs": [str(folder / f"{job.job_id}_{t}_log.out") for t in range(p.tasks)]}
    info = {"submitted": submitted, "run_dir": str(Path(cfg.run.dir).absolute()),
            "folder": str(folder), "config": str(snapshot),
            "profile": str(profile_path(cfg.slurm.profile, cfg.slurm.profile_dir)), "stages": stages}
    path = jobs_file(cfg.run.dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(path, json.dumps(info, indent=2))
    return info


def require_slurm() -> None:
    if not shutil.which("sbatch") or not shutil.which("srun"):
        raise UserError("no sbatch/srun here: submit from a SLURM login node, or start the local cluster "
                        "(slurm/cluster.sh up); --dry-run prints the scripts without SLURM")


def test_only(p: StagePlan, folder: Path, **extra: Any) -> None:
    """Ask slurmctld whether it could ever run this stage as planned (``sbatch --test-only`` queues nothing),
    so that what the cluster cannot give (GPUs, nodes, a partition) is refused before any stage is queued."""
    out = subprocess.run(["sbatch", "--test-only"], input=script(p, folder, **extra), capture_output=True, text=True,
                         timeout=120)
    if out.returncode != 0:
        lines = [ln.strip() for ln in out.stderr.splitlines() if ln.strip()] or [f"exit code {out.returncode}"]
        errors = [ln.split("error:", 1)[1].strip() for ln in lines if "error:" in ln]
        reason = errors[0] if errors else lines[-1].removeprefix("allocation failure:").strip()
        raise UserError(f"sbatch refused the {p.stage} stage ({_ask(p)}): {reason}")


def _ask(p: StagePlan) -> str:
    q = p.params
    ask = f"{q['nodes']} node(s) x {q['ntasks_per_node']} task(s)"
    if q.get("gpus_per_node"):
        ask += f", {q['gpus_per_node']} GPU(s) per node"
    return ask + (f", partition {q['partition']}" if q.get("partition") else "")


@contextlib.contextmanager
def submission_env() -> Iterator[None]:
    """The environment sbatch runs in (and the jobs inherit): no SLURM_*/RANK/MASTER_* variables of a job or
    torchrun we might run inside, but the ones that choose the cluster, which submitit's clean_env drops too."""
    keep = {k: os.environ[k] for k in CLUSTER_SELECTION if k in os.environ}
    with submitit.helpers.clean_env():
        os.environ.update(keep)
        try:
            yield
        finally:
            for k in keep:
                os.environ.pop(k, None)  # clean_env puts back what it took, these included


def _submit_one(p: StagePlan, folder: Path, done: dict[str, Any], max_requeues: int, config_path: str):
    executor = Executor(folder=folder, max_num_timeout=max_requeues)
    dep = {"dependency": "afterok:" + list(done.values())[-1]["job_id"]} if done else {}
    executor.update_parameters(**p.params, **dep)
    return executor.submit(job_callable(p.stage), config_path, [])


def cancel(ids: list[str]) -> None:
    if ids:
        subprocess.run(["scancel", *ids], check=False)


def refuse_active_chain(run_dir: str) -> None:
    """Two chains on one run.dir would train into the same checkpoints."""
    info = read_jobs(run_dir)
    if info is None:
        return
    ids = {s["job_id"] for s in info["stages"].values()}
    # ids restart on a rebuilt cluster: only a job with our id AND our name is ours
    # %F: the job id, or an array element's array job id (a sweep's jobs.json holds those)
    out = subprocess.run(["squeue", "-h", "-o", "%F %j", "-j", ",".join(sorted(ids))], capture_output=True, text=True)
    names = {f"{s['job_id']} {s.get('name', '')}" for s in info["stages"].values()}
    active = sorted({ln.split()[0] for ln in out.stdout.splitlines() if ln.strip() in names})
    if active:
        raise UserError(f"{run_dir} already has a SLURM chain queued or running (jobs {', '.join(active)}): "
                        f"wait for it (medgen status {run_dir}) or cancel it (scancel {' '.join(active)})")


def describe(info: dict[str, Any]) -> str:
    """What ``medgen run --executor slurm`` prints: job ids, logs, how to follow them."""
    stages = info["stages"]
    lines = [f"submitted {len(stages)} SLURM jobs (profile {info['profile']}), each after the one before succeeded:"]
    for name, s in stages.items():
        more = f" (+{s['tasks'] - 1} more: {Path(s['logs'][0]).name.replace('_0_', '_*_')})" if s["tasks"] > 1 else ""
        lines.append(f"  {name:<9} job {s['job_id']:<8} {s['tasks']} task(s)  log {s['logs'][0]}{more}")
    ids = ",".join(s["job_id"] for s in stages.values())
    lines += [
        f"follow:  tail -f {stages[next(iter(stages))]['logs'][0]}",
        f"         squeue -j {ids}",
        f"         medgen status {info['run_dir']}",
        f"cancel:  scancel {ids.replace(',', ' ')}",
        f"jobs:    {jobs_file(info['run_dir'])}",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- status


def job_states(ids: list[str], since: str) -> dict[str, tuple[str, str, str]]:
    """job id -> (state, exit code, elapsed) from sacct; squeue for jobs sacct has not recorded yet."""
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-S", since, "-o", "JobID,State,ExitCode,Elapsed",
                          "-j", ",".join(ids)], capture_output=True, text=True)
    if out.returncode != 0:
        raise UserError(f"sacct failed: {out.stderr.strip() or out.returncode} (is SLURM_CONF set?)")
    states: dict[str, tuple[str, str, str]] = {}
    for line in out.stdout.splitlines():
        jid, state, code, elapsed = line.split("|")
        states[jid] = (state.split()[0], code, elapsed)  # "CANCELLED by 0" -> CANCELLED
    missing = [i for i in ids if i not in states]  # sacct lags a second or two behind sbatch
    if missing:
        q = subprocess.run(["squeue", "-h", "-o", "%i|%T", "-j", ",".join(missing)], capture_output=True, text=True)
        for line in q.stdout.splitlines():
            jid, state = line.split("|")
            states[jid] = (state, "", "")
    return states


def status(run_dir: str) -> tuple[str, int]:
    """A table of the chain's stages and their states; exit code 1 when a stage failed or was cancelled."""
    info = read_jobs(run_dir)
    if info is None:
        raise UserError(f"{jobs_file(run_dir)} not found: no SLURM chain was submitted for this run.dir "
                        f"(medgen run --config C --executor slurm run.dir={run_dir})")
    stages = info["stages"]
    states = job_states([s["job_id"] for s in stages.values()], info["submitted"])
    lines = [f"{run_dir}: SLURM chain submitted {info['submitted']}",
             f"  {'stage':<9} {'job':<8} {'state':<13} {'elapsed':<10} log"]
    failed, cancelled = None, []
    for name, s in stages.items():
        state, code, elapsed = states.get(s["job_id"], ("UNKNOWN", "", ""))
        lines.append(f"  {name:<9} {s['job_id']:<8} {state:<13} {elapsed or '-':<10} {log_cell(s['logs'][0])}")
        if state in FAILED and failed is None:
            failed = (name, state, code, failed_log(s["logs"]))
        elif state == "CANCELLED":
            cancelled.append(name)
    if failed:
        name, state, code, log_path = failed
        error = error_line(log_path)
        lines.append(f"stage {name} failed ({state}, SLURM exit code {code}): see {log_path}")
        if error:
            lines.append(f"  {error}")
    if cancelled:
        why = "their dependency failed" if failed else "scancel"
        lines.append(f"cancelled: {', '.join(cancelled)} ({why})")
    return "\n".join(lines), 1 if failed or cancelled else 0


# --------------------------------------------------------------------------- inside the job


class StageJob(submitit.helpers.Checkpointable):
    """One stage as a submitit callable: every SLURM task of the job calls it with the same arguments."""

    stage = ""

    def __call__(self, config_path: str, overrides: Sequence[str] = ()) -> Any:
        with logging_for(quiet=False, debug=False):
            logging.getLogger("submitit").propagate = False  # it has its own handler: don't log every line twice
            return self._run(config_path, overrides)

    def _run(self, config_path: str, overrides: Sequence[str]) -> Any:
        from medgen import dist
        from medgen.launch import local

        cfg = config.load_config(config_path, list(overrides))
        if self.stage in DISTRIBUTED and Path(sys.argv[0]).name == "_submit.py":  # submitit's runner: ours to restart
            from medgen import allocator

            allocator.ensure(cfg.run.allocator)  # may start this task again with jemalloc preloaded
        shell = os.environ.get("MEDGEN_UMASK")  # set by the job script (stage_plan)
        private = os.umask(int(shell, 8)) if shell else current_umask()
        from medgen import watchdog

        log.info("%s: medgen %s from %s", self.stage, medgen.__version__, Path(medgen.__file__).parent)
        dist.from_slurm(self.stage in DISTRIBUTED, watchdog.pg_timeout(cfg.run))
        if self.stage in DISTRIBUTED:
            where = dist.record_placement(cfg.run.dir, self.stage)
            log.info("rank %d of %d on %s (%s), %s%s", where["rank"], where["world_size"], where["host"],
                     where["ip"], where["device"], f", GPU {where['gpu']} of this node" if where["gpu"] else "")
        try:
            try:  # the stage's outputs under the submitting shell's umask; submitit's own files stay private
                return local.run_stage(self.stage, cfg)
            finally:
                os.umask(private)
        except TryAgain as e:  # requeue, the rerun resumes
            _hand_over_to_submitit(e)

    def checkpoint(self, config_path: str, overrides: Sequence[str] = ()) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on rank 0 before it requeues: the same stage with the same config. The
        progress is on disk (train: <run.dir>/checkpoints; generate: completions done), none in this object."""
        return submitit.helpers.DelayedSubmission(self, config_path, overrides)


def _job_state() -> str:
    out = subprocess.run(["scontrol", "show", "job", "-o", os.environ.get("SLURM_JOB_ID", "")], capture_output=True,
                         text=True, timeout=60)
    m = re.search(r"\bJobState=(\S+)", out.stdout)
    return m.group(1) if m else "UNKNOWN"


def _hand_over_to_submitit(err: Exception) -> NoReturn:
    """train stopped on USR2/SIGTERM after a complete checkpoint and restored submitit's handlers: run
    submitit's USR2 handler now. On rank 0 it calls ``checkpoint()``, requeues the job and exits; on
    the other ranks it returns, and they wait to be killed by the requeue (exiting with an error now
    would make srun kill rank 0 before it requeued).

    Unless SLURM is ending the job itself: ``scancel`` also sends SIGTERM, and requeueing then would
    undo the cancel (the checkpoint stays on disk for a later run); a preemption that SLURM requeues
    itself needs no second requeue."""
    handler = signal.getsignal(signal.SIGUSR2)
    if not callable(handler):  # not under submitit
        raise err
    state = _job_state()
    if state != "RUNNING":
        log.warning("%s; the job is %s, so it is not requeued", err, state)
        raise err
    # a second preemption signal arriving while the handler runs would requeue twice
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2, signal.SIGTERM})
    log.warning("%s; handing over to submitit to requeue the job (it logs this as SIGUSR2)", err)
    handler(signal.SIGUSR2, None)
    time.sleep(REQUEUE_WAIT_S)
    raise RuntimeError(f"preempted, but rank 0 did not requeue the job within {REQUEUE_WAIT_S} s") from err

