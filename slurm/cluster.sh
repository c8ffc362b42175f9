#!/usr/bin/env bash
# A single-node SLURM cluster on localhost for development and CI: munged + mariadb + slurmdbd +
# slurmctld + slurmd, started by hand (no systemd), as root. Accounting is on because submitit reads
# job states with `sacct`.
#
#   slurm/cluster.sh up            install the Debian packages if missing, start what is not running
#   slurm/cluster.sh down [--purge] stop only the daemons this script started (PIDs it recorded);
#                                  --purge also deletes state, logs and the accounting database
#   slurm/cluster.sh status        print the daemons and `sinfo`
#
# State lives under ${MEDGEN_INFRA:-/tmp/medgen-infra}/slurm; clients need `source <that>/env.sh`
# (SLURM_CONF). Idempotent: `up` twice starts nothing the second time.
# Exit codes: 0 ok, 1 a daemon failed to start, 3 SLURM cannot be installed on this machine (not
# root, no apt-get, or apt-get failed): the test suite skips on 3 only.
set -euo pipefail
INFRA=${MEDGEN_INFRA:-/tmp/medgen-infra}
D=$INFRA/slurm; RUN=$D/run; LOG=$D/log
export SLURM_CONF=$D/slurm.conf
t0=$(date +%s%N)
log() { local ms=$(( ($(date +%s%N) - t0) / 1000000 )); printf '[cluster.sh %3d.%03ds] %s\n' $((ms/1000)) $((ms%1000)) "$*"; }
cannot_install() { echo "cluster.sh: SLURM cannot be installed here: $*" >&2; exit 3; }

# a daemon we started is alive only if its recorded PID still runs the expected program
alive() { local f=$RUN/$1.pid; [[ -s $f ]] && kill -0 "$(cat "$f")" 2>/dev/null &&
          grep -q "$2" "/proc/$(cat "$f")/comm" 2>/dev/null; }
wait_for() { local what=$1 tries=$2; shift 2; for _ in $(seq "$tries"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
             echo "cluster.sh: timeout waiting for $what" >&2; tail -n 30 "$LOG"/*.log >&2 || true; exit 1; }

install_packages() {
  local pkgs=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server)
  dpkg -s "${pkgs[@]}" >/dev/null 2>&1 && return 0
  [[ $(id -u) == 0 ]] || cannot_install "packages ${pkgs[*]} are missing and installing them needs root"
  command -v apt-get >/dev/null || cannot_install "no apt-get (Debian/Ubuntu only)"
  log "installing ${pkgs[*]}"
  apt-get update -qq || cannot_install "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null ||
    cannot_install "apt-get install ${pkgs[*]} failed"
}

write_config() {
  local cpus mem
  cpus=$(nproc); mem=$(( $(awk '/MemTotal/{print int($2/1024)}' /proc/meminfo) * 9 / 10 ))
  # Rewritten each time; identical content, so safe while the daemons run.
  # cred_expire=10 + a fast scheduler: a requeued job restarts in ~15 s instead of 121 s.
  # proctrack/linuxproc + task/none: no cgroups here (proctrack/cgroup needs the freezer controller).
  cat > "$SLURM_CONF.tmp" <<EOF
ClusterName=medgen
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=2,sched_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=512
ReturnToService=2
MailProg=/bin/true
SlurmctldTimeout=30
SlurmdTimeout=30
MinJobAge=300
KillWait=5
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
  mv "$SLURM_CONF.tmp" "$SLURM_CONF"
  cat > "$D/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
LogFile=$LOG/slurmdbd.log
PidFile=$RUN/slurmdbd.pid.dbd
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=3306
StorageUser=slurm
StoragePass=slurmpw
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$D/slurmdbd.conf"  # slurmdbd refuses a readable file that holds a password
  echo "export SLURM_CONF=$SLURM_CONF" > "$D/env.sh"
  # clients without SLURM_CONF read /etc/slurm/slurm.conf; never replace a real file there
  if [[ ! -e /etc/slurm/slurm.conf || -L /etc/slurm/slurm.conf ]]; then ln -sfn "$SLURM_CONF" /etc/slurm/slurm.conf; fi
}

start_munge() {
  mkdir -p /run/munge /var/log/munge /var/lib/munge /etc/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge; chmod 0755 /run/munge
  [[ -s /etc/munge/munge.key ]] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
  chown munge:munge /etc/munge /etc/munge/munge.key; chmod 0700 /etc/munge; chmod 0400 /etc/munge/munge.key
  if alive munged munged || munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then log "munged already running"; return; fi
  # setpriv (not su) so that $! is munged's own PID
  setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged -F --pid-file=/run/munge/munged.pid \
    --log-file=/var/log/munge/munged.log >>"$LOG/munged.out" 2>&1 & echo $! > "$RUN/munged.pid"
  wait_for munged 50 bash -c 'munge -n | unmunge'
  log "munged started (pid $(cat "$RUN/munged.pid"))"
}

start_accounting() {
  local sock=$D/mysqlrun/mysqld.sock
  if alive mariadbd mariadbd; then log "mariadb already running"; else
    mkdir -p "$D/mysqlrun"; chown mysql:mysql "$D/mysqlrun"
    if [[ ! -d $D/mysql/mysql ]]; then
      rm -rf "$D/mysql"; mkdir -p "$D/mysql"; chown mysql:mysql "$D/mysql"
      mariadb-install-db --user=mysql --datadir="$D/mysql" --skip-test-db >"$LOG/mysql_install.log" 2>&1
    fi
    # --no-defaults first: ignore /etc/mysql, run from a private datadir and socket
    /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$D/mysql" --socket="$sock" \
      --pid-file="$D/mysqlrun/mysqld.pid" --bind-address=127.0.0.1 --port=3306 --log-error="$LOG/mariadb.log" \
      --innodb-buffer-pool-size=128M --innodb-lock-wait-timeout=900 >>"$LOG/mariadb.out" 2>&1 &
    echo $! > "$RUN/mariadbd.pid"
    wait_for mariadb 100 mariadb --no-defaults -S "$sock" -uroot -e 'select 1'
    mariadb --no-defaults -S "$sock" -uroot -e "
      CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmpw';
      CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurmpw';
      GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
    log "mariadb started (pid $(cat "$RUN/mariadbd.pid"))"
  fi
  if alive slurmdbd slurmdbd; then log "slurmdbd already running"; return; fi
  slurmdbd -D >>"$LOG/slurmdbd.out" 2>&1 & echo $! > "$RUN/slurmdbd.pid"  # reads $(dirname $SLURM_CONF)/slurmdbd.conf
  wait_for slurmdbd 100 bash -c 'exec 3<>/dev/tcp/127.0.0.1/6819'
  log "slurmdbd started (pid $(cat "$RUN/slurmdbd.pid"))"
}

start_slurm() {
  local fresh=0
  if alive slurmctld.fg slurmctld; then log "slurmctld already running"; else
    slurmctld -D -c -i >>"$LOG/slurmctld.out" 2>&1 & echo $! > "$RUN/slurmctld.fg.pid"  # -c: empty job queue
    wait_for slurmctld 150 scontrol ping
    log "slurmctld started (pid $(cat "$RUN/slurmctld.fg.pid"))"; fresh=1
  fi
  if alive slurmd.fg slurmd; then log "slurmd already running"; else
    slurmd -D -N localhost >>"$LOG/slurmd.out" 2>&1 & echo $! > "$RUN/slurmd.fg.pid"  # -N: node name != hostname
    log "slurmd started (pid $(cat "$RUN/slurmd.fg.pid"))"; fresh=1
  fi
  wait_for "node idle" 150 bash -c 'sinfo -h -N -o %T | grep -qE "^(idle|mixed|allocated)"'
  if sinfo -h -N -o %T | grep -qE 'down|drain'; then scontrol update nodename=localhost state=resume; fi
  wait_for "cluster registered in slurmdbd" 100 bash -c 'sacctmgr -n -P list cluster format=cluster | grep -qx medgen'
  [[ $fresh == 1 ]] && smoke_test
  log "cluster up: $(sinfo -h -N -o '%N %T %c cpus %m MB'); use: source $D/env.sh"
}

smoke_test() {  # only after starting daemons: a second `up` stays fast
  local jid
  jid=$(cd "$D" && sbatch -o "$D/smoke-%j.out" --parsable --wrap 'srun -n1 hostname')
  wait_for "smoke job $jid" 300 bash -c "[[ -z \$(squeue -h -j $jid 2>/dev/null) ]]"
  [[ -s $D/smoke-$jid.out ]] || { echo "cluster.sh: smoke job $jid wrote nothing" >&2; exit 1; }
  log "smoke job $jid ran on $(cat "$D/smoke-$jid.out")"
}

up() {
  install_packages
  mkdir -p "$D"/{state,spool,log,run} /etc/slurm
  write_config
  start_munge
  start_accounting
  start_slurm
}

stop() {  # stop <pidfile name> <expected comm>: only a PID this script recorded, and only if it is still ours
  local f=$RUN/$1.pid pid
  [[ -s $f ]] || return 0; pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null && grep -q "$2" "/proc/$pid/comm" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then echo "SIGKILL $2 ($pid)"; kill -KILL "$pid"; fi
    echo "stopped $2 (pid $pid)"
  fi
  rm -f "$f"
}

down() {
  # cancel the jobs first so that no slurmstepd outlives slurmd
  if alive slurmctld.fg slurmctld; then
    local ids; ids=$(squeue -h -o %A 2>/dev/null | tr '\n' ' ')
    if [[ -n ${ids// } ]]; then
      # shellcheck disable=SC2086
      scancel $ids; for _ in $(seq 50); do [[ -z $(squeue -h 2>/dev/null) ]] && break; sleep 0.2; done
    fi
  fi
  stop slurmd.fg slurmd
  stop slurmctld.fg slurmctld
  stop slurmdbd slurmdbd
  stop mariadbd mariadbd
  stop munged munged
  rm -f "$RUN"/slurmctld.pid "$RUN"/slurmd.pid "$RUN"/slurmdbd.pid.dbd
  if [[ ${1:-} == --purge ]]; then rm -rf "$D"/{state,spool,log,mysql,mysqlrun} "$D"/smoke-*.out; echo "purged $D"; fi
}

status() {
  local n
  for n in munged:munged mariadbd:mariadbd slurmdbd:slurmdbd slurmctld.fg:slurmctld slurmd.fg:slurmd; do
    if alive "${n%%:*}" "${n##*:}"; then echo "${n##*:}: running (pid $(cat "$RUN/${n%%:*}.pid"))"
    else echo "${n##*:}: not started by cluster.sh"; fi
  done
  sinfo 2>&1 || true
}

case ${1:-} in
  up) up ;;
  down) shift; down "$@" ;;
  status) status ;;
  *) echo "usage: $0 up | down [--purge] | status" >&2; exit 2 ;;
esac
