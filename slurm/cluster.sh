#!/usr/bin/env bash
# A real SLURM cluster of N nodes on this one machine, for development and CI, as root, no systemd.
# Each node is its own network namespace (own IP on a bridge) and UTS namespace (own hostname) running its
# own slurmd, with fake GPUs through GRES; munged, mariadb, slurmdbd and slurmctld stay in the root
# namespace. Accounting is on because submitit reads job states with `sacct`.
#
#   slurm/cluster.sh up [--nodes N] [--gpus G]  install the Debian packages if missing, start what is not
#                                               running (N nodes, default 2; G fake GPUs per node, default 2)
#   slurm/cluster.sh down [--nodes N] [--purge]  stop the daemons this script started (recorded PIDs) and what
#                                               runs inside its namespaces, delete namespaces, veths, bridge,
#                                               /etc/netns entries; without --nodes: every size it brought up;
#                                               --purge also deletes state, logs and the accounting database
#   slurm/cluster.sh status [--nodes N]         the daemons and `sinfo`
#   slurm/cluster.sh crash NODE [--nodes N]     kill -9 a node's slurmd and everything in its namespace (a lost
#                                               node, for tests); `up` brings it back
#
# Each size is its own cluster (ClusterName medgenN, own ports, subnet and state under
# ${MEDGEN_INFRA:-/tmp/medgen-infra}/slurm-Nnode), so a one-node and a two-node cluster can run side by side.
# Clients select one with SLURM_CONF: `source <state dir>/env.sh`. /etc/slurm is never touched.
# Idempotent: `up` twice starts nothing the second time; a crashed node's slurmd is restarted and resumed.
# Exit codes: 0 ok, 1 a daemon failed to start, 2 usage, 3 SLURM cannot be installed or run here (not root,
# no apt-get, apt-get failed, no network namespaces): the test suite skips on 3 only, never in CI.
set -euo pipefail
usage() { sed -n '7,16p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

cmd=${1:-}; [[ -n $cmd ]] || usage; shift
NODES_N=2 NGPU=2 PURGE=0 NODE_ARG="" SIZE_GIVEN=0
while (($#)); do
  case $1 in
    --nodes) NODES_N=${2:?}; SIZE_GIVEN=1; shift 2 ;;
    --gpus) NGPU=${2:?}; shift 2 ;;
    --purge) PURGE=1; shift ;;
    -*) usage ;;
    *) NODE_ARG=$1; shift ;;
  esac
done
[[ $NODES_N =~ ^[1-9]$ && $NGPU =~ ^[0-8]$ ]] || { echo "cluster.sh: --nodes 1-9, --gpus 0-8" >&2; exit 2; }

INFRA=${MEDGEN_INFRA:-/tmp/medgen-infra}
t0=$(date +%s%N)
log() { local ms=$(( ($(date +%s%N) - t0) / 1000000 )); printf '[cluster.sh %3d.%03ds] %s\n' $((ms/1000)) $((ms%1000)) "$*"; }
cannot() { echo "cluster.sh: SLURM cannot run here: $*" >&2; exit 3; }

# Everything that names one cluster, derived from its size N so that sizes never collide.
select_size() {
  N=$1
  D=$INFRA/slurm-${N}node; RUN=$D/run; LOG=$D/log; M=$D/munge; SOCK=$D/mysqlrun/mysqld.sock
  CLUSTER=medgen$N; CTL_NAME=mg${N}ctl; NET=10.79.$N; CTL_IP=$NET.1; BR=mg${N}br
  local base=$((7800 + 10 * N))
  CTLD_PORT=$base SLURMD_PORT=$((base + 1)) DBD_PORT=$((base + 2)) DB_PORT=$((base + 3))
  SRUN_PORTS=$((60000 + 200 * N))-$((60199 + 200 * N))
  NODE_NAMES=() NETNS=() IPS=() VETHS=()
  local k
  for k in $(seq "$N"); do
    NODE_NAMES+=("mg${N}node$k"); NETNS+=("mg${N}n$k"); IPS+=("$NET.$((10 + k))"); VETHS+=("mg${N}v$k")
  done
  export SLURM_CONF=$D/slurm.conf
}

# A zombie counts as dead: PID 1 of these machines reaps orphans a second or two late.
running() { kill -0 "$1" 2>/dev/null && [[ $(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -c1) != Z ]]; }
# alive <pidfile name> <comm> [netns]: a daemon this script started still runs (in the expected namespace)
alive() {
  local f=$RUN/$1.pid p; [[ -s $f ]] || return 1; p=$(cat "$f")
  running "$p" && grep -qx "$2" "/proc/$p/comm" 2>/dev/null || return 1
  [[ -z ${3:-} ]] || [[ $(ip netns identify "$p" 2>/dev/null) == "$3" ]]
}
wait_for() {
  local what=$1 tries=$2; shift 2
  for _ in $(seq "$tries"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  echo "cluster.sh: timeout waiting for $what" >&2; tail -n 20 "$LOG"/*.log >&2 || true; exit 1
}
CHANGED=()
put() {  # put FILE < content: replace only when the content changed (running daemons read some of these)
  local f=$1 tmp; tmp=$(mktemp "$f.XXXX"); chmod 644 "$tmp"; cat > "$tmp"
  if cmp -s "$tmp" "$f"; then rm -f "$tmp"; else [[ -e $f ]] && CHANGED+=("$f"); mv "$tmp" "$f"; fi
}

# --------------------------------------------------------------------------- up

install_packages() {
  local pkgs=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server iproute2 util-linux)
  dpkg -s "${pkgs[@]}" >/dev/null 2>&1 && return 0
  [[ $(id -u) == 0 ]] || cannot "packages ${pkgs[*]} are missing and installing them needs root"
  command -v apt-get >/dev/null || cannot "no apt-get (Debian/Ubuntu only)"
  log "installing ${pkgs[*]}"
  apt-get update -qq || cannot "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null ||
    cannot "apt-get install ${pkgs[*]} failed"
}

check_namespaces() {
  [[ $(id -u) == 0 ]] || cannot "the nodes are network namespaces: run as root"
  ip netns list >/dev/null 2>&1 || cannot "ip netns does not work here (no iproute2 or no CAP_SYS_ADMIN)"
}

network() {
  ip link show "$BR" >/dev/null 2>&1 || ip link add "$BR" type bridge
  ip addr replace "$CTL_IP/24" dev "$BR"; ip link set "$BR" up
  local i ns v
  mkdir -p "$D/etc"
  { echo "127.0.0.1 localhost"; echo "$CTL_IP $CTL_NAME"
    for i in "${!NODE_NAMES[@]}"; do echo "${IPS[$i]} ${NODE_NAMES[$i]}"; done; } | put "$D/etc/hosts"
  for i in "${!NODE_NAMES[@]}"; do
    ns=${NETNS[$i]} v=${VETHS[$i]}
    [[ -e /run/netns/$ns ]] || ip netns add "$ns"
    if ! ip netns exec "$ns" ip link show eth0 >/dev/null 2>&1 || ! ip link show "$v" >/dev/null 2>&1; then
      ip link del "$v" 2>/dev/null || true; ip netns exec "$ns" ip link del eth0 2>/dev/null || true
      ip link add "$v" type veth peer name eth0 netns "$ns"
    fi
    ip link set "$v" master "$BR" up
    ip netns exec "$ns" ip link set lo up
    ip netns exec "$ns" ip addr replace "${IPS[$i]}/24" dev eth0
    ip netns exec "$ns" ip link set eth0 up
    ip netns exec "$ns" ip route replace default via "$CTL_IP"
    # `ip netns exec` bind-mounts /etc/netns/<ns>/* over /etc: the node's own names, and a resolver that
    # fails at once (the host's nameserver is unreachable from here; glibc would wait 2x5 s per reverse
    # lookup, and c10d makes one per rendezvous)
    mkdir -p "/etc/netns/$ns"
    put "/etc/netns/$ns/hosts" < "$D/etc/hosts"
    printf 'nameserver 127.0.0.1\noptions timeout:1 attempts:1\n' | put "/etc/netns/$ns/resolv.conf"
  done
  wait_for "bridge ports forwarding" 50 \
    bash -c "[[ \$(bridge link show | grep -c 'master $BR state forwarding') == $N ]]"
}

write_config() {
  local cpus mem gres_types="" gres="" g i
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/{print int($2/1024)}' /proc/meminfo) * 8 / 10 / N ))  # the nodes share the host
  if (( NGPU > 0 )); then
    gres_types=$'GresTypes=gpu\nAccountingStorageTRES=gres/gpu' gres="Gres=gpu:$NGPU"
    mkdir -p "$D/fakedev"
    for g in $(seq 0 $((NGPU - 1))); do  # gres.conf File= must be character devices: /dev/null's numbers
      [[ -c $D/fakedev/nvidia$g ]] || { rm -f "$D/fakedev/nvidia$g"; mknod -m 666 "$D/fakedev/nvidia$g" c 1 3; }
    done
    put "$D/gres.conf" <<EOF
AutoDetect=off
NodeName=$(IFS=,; echo "${NODE_NAMES[*]}") Name=gpu File=$D/fakedev/nvidia[0-$((NGPU - 1))]
EOF
  else rm -f "$D/gres.conf"; fi
  # cred_expire=10 + a fast scheduler: a requeued job restarts in seconds instead of two minutes.
  # proctrack/linuxproc + task/none: no cgroups inside the namespaces.
  # AccountingStoragePass: AuthInfo's socket does not cover slurmdbd traffic.
  {
    cat <<EOF
ClusterName=$CLUSTER
SlurmctldHost=$CTL_NAME($CTL_IP)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SrunPortRange=$SRUN_PORTS
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$M/munge.socket,cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$CTL_IP
AccountingStoragePort=$DBD_PORT
AccountingStoragePass=$M/munge.socket
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=2,sched_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=512
$gres_types
ReturnToService=2
MailProg=/bin/true
SlurmctldTimeout=30
SlurmdTimeout=20
MinJobAge=300
KillWait=5
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool/%n
SlurmctldPidFile=$RUN/slurmctld.daemon.pid
SlurmdPidFile=$RUN/slurmd.%n.daemon.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.%n.log
EOF
    for i in "${!NODE_NAMES[@]}"; do
      echo "NodeName=${NODE_NAMES[$i]} NodeAddr=${IPS[$i]} NodeHostname=${NODE_NAMES[$i]} CPUs=$cpus RealMemory=$mem $gres State=UNKNOWN"
    done
    echo "PartitionName=debug Nodes=$(IFS=,; echo "${NODE_NAMES[*]}") Default=YES MaxTime=INFINITE State=UP"
  } | put "$SLURM_CONF"
  # slurmd in a namespace sees an empty /sys/fs/cgroup: name the plugin so it does not autodetect
  echo "CgroupPlugin=cgroup/v1" | put "$D/cgroup.conf"
  put "$D/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$M/munge.socket
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
LogFile=$LOG/slurmdbd.log
PidFile=$RUN/slurmdbd.daemon.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurmpw
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$D/slurmdbd.conf"  # slurmdbd refuses a readable file that holds a password
  echo "export SLURM_CONF=$SLURM_CONF" | put "$D/env.sh"
}

start_munge() {  # its own key, socket and seed: nothing of a system munged is used
  if [[ ! -s $M/munge.key ]]; then dd if=/dev/urandom of="$M/munge.key" bs=1 count=1024 status=none; fi
  chown munge:munge "$M" "$M/munge.key"; chmod 0755 "$M"; chmod 0400 "$M/munge.key"
  if alive munged munged; then return; fi
  rm -f "$M/munge.socket" "$M/munge.socket.lock"
  # setpriv (not su) so that $! is munged's own PID
  setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged -F --socket="$M/munge.socket" \
    --key-file="$M/munge.key" --pid-file="$M/munged.pid" --log-file="$M/munged.log" --seed-file="$M/munged.seed" \
    </dev/null >>"$LOG/munged.out" 2>&1 & echo $! > "$RUN/munged.pid"
  wait_for munged 50 bash -c "munge -S '$M/munge.socket' -n | unmunge -S '$M/munge.socket'"
  log "munged started (pid $(cat "$RUN/munged.pid"))"
}

start_accounting() {
  if ! alive mariadbd mariadbd; then
    mkdir -p "$D/mysqlrun"; chown mysql:mysql "$D/mysqlrun"
    if [[ ! -d $D/mysql/mysql ]]; then
      rm -rf "$D/mysql"; mkdir -p "$D/mysql"; chown mysql:mysql "$D/mysql"
      mariadb-install-db --no-defaults --user=mysql --datadir="$D/mysql" --skip-test-db >"$LOG/mysql_install.log" 2>&1
    fi
    # --no-defaults: ignore /etc/mysql, run from a private datadir, socket and port
    /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$D/mysql" --socket="$SOCK" \
      --pid-file="$D/mysqlrun/mysqld.pid" --bind-address=127.0.0.1 --port="$DB_PORT" --log-error="$LOG/mariadb.log" \
      --innodb-buffer-pool-size=64M --innodb-lock-wait-timeout=900 --performance-schema=OFF \
      </dev/null >>"$LOG/mariadb.out" 2>&1 & echo $! > "$RUN/mariadbd.pid"
    wait_for mariadb 150 mariadb --no-defaults -S "$SOCK" -uroot -e 'select 1'
    mariadb --no-defaults -S "$SOCK" -uroot -e "
      CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmpw';
      CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurmpw';
      GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
    log "mariadb started (pid $(cat "$RUN/mariadbd.pid"), port $DB_PORT)"
  fi
  if alive slurmdbd slurmdbd; then return; fi
  slurmdbd -D </dev/null >>"$LOG/slurmdbd.out" 2>&1 & echo $! > "$RUN/slurmdbd.pid"  # reads $D/slurmdbd.conf
  wait_for slurmdbd 150 bash -c "exec 3<>/dev/tcp/127.0.0.1/$DBD_PORT"
  log "slurmdbd started (pid $(cat "$RUN/slurmdbd.pid"), port $DBD_PORT)"
}

start_slurmctld() {
  if alive slurmctld slurmctld; then return; fi
  # own UTS namespace (its hostname must be SlurmctldHost's) and mount namespace (an /etc/hosts that knows
  # the node names; the host's is left alone)
  unshare --uts --mount sh -c "mount --bind '$D/etc/hosts' /etc/hosts && hostname $CTL_NAME &&
    exec slurmctld -D -c -i -f '$SLURM_CONF'" </dev/null >>"$LOG/slurmctld.out" 2>&1 & echo $! > "$RUN/slurmctld.pid"
  wait_for slurmctld 150 scontrol ping
  log "slurmctld started (pid $(cat "$RUN/slurmctld.pid"), $CTL_IP:$CTLD_PORT)"; FRESH=1
}

start_slurmds() {
  local i n ns
  for i in "${!NODE_NAMES[@]}"; do
    n=${NODE_NAMES[$i]} ns=${NETNS[$i]}
    alive "slurmd.$n" slurmd "$ns" && continue
    # `exec` all the way down, so that $! is slurmd's own PID
    ip netns exec "$ns" unshare --uts sh -c "hostname $n && exec slurmd -D -f '$SLURM_CONF'" \
      </dev/null >>"$LOG/slurmd.$n.out" 2>&1 & echo $! > "$RUN/slurmd.$n.pid"
    log "slurmd $n started (pid $(cat "$RUN/slurmd.$n.pid"), ${IPS[$i]}:$SLURMD_PORT)"; FRESH=1
  done
}

nodes_ready() {
  local n
  [[ $(sinfo -h -N -o '%N %T' | grep -cE ' (idle|mixed|allocated|completing)$') == "$N" ]] && return 0
  # a node left DOWN (a crash, scontrol) is resumed once its slurmd answers
  for n in "${NODE_NAMES[@]}"; do
    if sinfo -h -n "$n" -o %T | grep -qE '^(down|drain)'; then scontrol update nodename="$n" state=resume 2>/dev/null || true; fi
  done
  return 1
}

smoke_test() {  # only after starting daemons: a second `up` stays fast
  local jid out
  jid=$(cd "$D" && sbatch -N "$N" -o "$D/smoke-%j.out" --parsable --wrap 'srun hostname')
  wait_for "smoke job $jid" 300 bash -c "[[ -z \$(squeue -h -j $jid 2>/dev/null) ]]"
  out=$(sort "$D/smoke-$jid.out" 2>/dev/null | tr '\n' ' ')
  [[ $(wc -w <<<"$out") == "$N" ]] || { echo "cluster.sh: smoke job $jid ran on '$out', expected $N nodes" >&2; exit 1; }
  log "smoke job $jid ran on $out"
}

up() {
  install_packages
  check_namespaces
  mkdir -p "$D" "$RUN" "$LOG" "$D/state" "$M"
  for n in "${NODE_NAMES[@]}"; do mkdir -p "$D/spool/$n"; done
  network
  write_config
  start_munge
  start_accounting
  FRESH=0
  start_slurmctld
  start_slurmds
  wait_for "$N nodes idle" 150 nodes_ready
  wait_for "cluster $CLUSTER registered in slurmdbd" 150 \
    bash -c "sacctmgr -n -P list cluster format=cluster | grep -qx $CLUSTER"
  if (( FRESH )); then smoke_test; fi
  if (( ${#CHANGED[@]} && !FRESH )); then
    log "NOTE: changed ${CHANGED[*]}; running daemons keep the old settings (down, then up)"
  fi
  log "cluster $CLUSTER up: $(sinfo -h -N -o '%N %T' | tr '\n' ' ')(${NGPU} GPUs/node); use: source $D/env.sh"
}

# --------------------------------------------------------------------------- down, status, crash

stop_pid() {  # stop_pid PID LABEL: TERM, up to 10 s, then KILL
  local pid=$1
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 100); do running "$pid" || break; sleep 0.1; done
  if running "$pid"; then log "SIGKILL $2 ($pid)"; kill -KILL "$pid" 2>/dev/null || true; fi
  log "stopped $2 (pid $pid)"
}

stop() {  # stop PIDFILE-NAME COMM: only a PID this script recorded, and only while it still runs COMM
  local f=$RUN/$1.pid pid
  [[ -s $f ]] || return 0; pid=$(cat "$f")
  if running "$pid" && grep -qx "$2" "/proc/$pid/comm" 2>/dev/null; then stop_pid "$pid" "$2"; fi
  rm -f "$f"
}

down_one() {
  local i ns pid ids
  # cancel the jobs first, so that no slurmstepd outlives its slurmd
  if alive slurmctld slurmctld; then
    ids=$(timeout 10 squeue -h -o %A 2>/dev/null | tr '\n' ' ' || true)
    if [[ -n ${ids// } ]]; then
      # shellcheck disable=SC2086
      timeout 10 scancel $ids || true
      for _ in $(seq 50); do [[ -z $(timeout 5 squeue -h 2>/dev/null) ]] && break; sleep 0.2; done
    fi
  fi
  for n in "${NODE_NAMES[@]}"; do stop "slurmd.$n" slurmd; done
  stop slurmctld slurmctld
  stop slurmdbd slurmdbd
  stop mariadbd mariadbd
  stop munged munged
  rm -f "$RUN"/*.daemon.pid
  for i in "${!NODE_NAMES[@]}"; do
    ns=${NETNS[$i]}
    if [[ -e /run/netns/$ns ]]; then
      # whatever is still inside our namespaces (stray slurmstepd or tasks) was started by our slurmd
      for pid in $(ip netns pids "$ns" 2>/dev/null); do
        running "$pid" && stop_pid "$pid" "$(cat "/proc/$pid/comm" 2>/dev/null || echo '?') in $ns"
      done
      ip netns del "$ns" && log "deleted netns $ns"  # takes its end of the veth pair, and so the pair
    fi
    if ip link show "${VETHS[$i]}" >/dev/null 2>&1; then ip link del "${VETHS[$i]}" 2>/dev/null || true; fi
    rm -rf "/etc/netns/$ns"
  done
  rmdir /etc/netns 2>/dev/null || true  # only when empty: nobody else uses it
  if ip link show "$BR" >/dev/null 2>&1; then ip link del "$BR" && log "deleted bridge $BR"; fi
  if (( PURGE )); then rm -rf "$D"; log "purged $D"; fi
  log "cluster $CLUSTER down"
}

status_one() {
  local n
  echo "cluster $CLUSTER ($D):"
  for n in munged:munged mariadbd:mariadbd slurmdbd:slurmdbd slurmctld:slurmctld; do
    if alive "${n%%:*}" "${n##*:}"; then echo "  ${n##*:}: running (pid $(cat "$RUN/${n%%:*}.pid"))"
    else echo "  ${n##*:}: not running"; fi
  done
  for n in "${NODE_NAMES[@]}"; do
    if alive "slurmd.$n" slurmd; then echo "  slurmd $n: running (pid $(cat "$RUN/slurmd.$n.pid"))"
    else echo "  slurmd $n: not running"; fi
  done
  if alive slurmctld slurmctld; then
    sinfo -N -o '%N %T %c %m %G' 2>&1 | sed 's/^/  /'
    echo "  use: source $D/env.sh"
  fi
}

crash() {  # kill -9 node NODE_ARG's slurmd, its slurmstepds and tasks: everything in its namespace
  local i pids
  for i in "${!NODE_NAMES[@]}"; do
    [[ ${NODE_NAMES[$i]} == "$NODE_ARG" ]] || continue
    pids=$(ip netns pids "${NETNS[$i]}" 2>/dev/null | tr '\n' ' ')
    # shellcheck disable=SC2086
    [[ -z ${pids// } ]] || kill -KILL $pids 2>/dev/null || true
    log "killed $NODE_ARG: ${pids:-nothing was running}"
    return 0
  done
  echo "cluster.sh: no node $NODE_ARG in $CLUSTER (nodes: ${NODE_NAMES[*]})" >&2; exit 2
}

sizes() {  # the sizes to act on: the one given, or every one brought up before
  if (( SIZE_GIVEN )); then echo "$NODES_N"; return; fi
  local d
  for d in "$INFRA"/slurm-*node; do [[ -d $d ]] && basename "$d" | tr -dc 0-9 && echo; done
}

case $cmd in
  up) select_size "$NODES_N"; up ;;
  down) for s in $(sizes); do select_size "$s"; down_one; done ;;
  status) for s in $(sizes); do select_size "$s"; status_one; done ;;
  crash) [[ -n $NODE_ARG ]] || usage; select_size "$NODES_N"; crash ;;
  *) usage ;;
esac
