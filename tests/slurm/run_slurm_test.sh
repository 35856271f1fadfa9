#!/usr/bin/env bash
# Run a Snakemake workflow through a real single-node Slurm and check it against a local run.
#
# Usage (as root, on a throwaway machine; installs and configures system packages):
#   tests/slurm/run_slurm_test.sh                      # the two-rule smoke workflow
#   tests/slurm/run_slurm_test.sh [options] RESULTS_DIR -- SNAKEMAKE_ARGS...
#   e.g. tests/slurm/run_slurm_test.sh results -- --configfile workflow/presets/ci.yaml
#
# Steps: apt-get install slurm-wlm slurmdbd munge mariadb-server; configure one node from
# `slurmd -C` (this machine's CPUs and memory) with fake GPUs as gres (no device files) in
# partitions `cpu` (default) and `gpu`; start munged, mariadb, slurmdbd, slurmctld, slurmd
# (the plugin polls `sacct`, which needs slurmdbd); run the workflow locally
# (--workflow-profile none, the profile's GPU requests, the fake GPU ids as CUDA_VISIBLE_DEVICES)
# and move RESULTS_DIR aside; run it again with the Slurm profile;
# check with sacct that every submitted job COMPLETED; compare both RESULTS_DIRs byte by byte.
#
# The profile is copied with its requests capped to this node (mem_mb <= node memory,
# gpu <= fake GPUs, gpu_model dropped, max-threads = CPUs); every other key is kept.
#
# Options:
#   --workdir DIR       directory Snakemake runs in (default: repository root)
#   --profile DIR       Slurm workflow profile (default: workflow/profiles/slurm)
#   --fake-gpus N       GPUs the node advertises as gres (default 4)
#   --allow-diff GLOB   ignore differences in files matching GLOB (relative to RESULTS_DIR)
#   --no-install        skip apt-get (packages already installed)
#   --keep-running      leave the Slurm daemons running afterwards
# Environment: PYTHON (default: the python on PATH, e.g. the activated .venv; must have snakemake
# and the Slurm executor plugin).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PYTHON=${PYTHON:-$(command -v python)}
WORKDIR=$REPO
PROFILE=$REPO/workflow/profiles/slurm
FAKE_GPUS=4
INSTALL=1
KEEP_RUNNING=0
ALLOW_DIFF=()
CLUSTER=dspotest

while [[ $# -gt 0 && $1 == --* && $1 != -- ]]; do
    case $1 in
        --workdir) WORKDIR=$(realpath "$2"); shift 2 ;;
        --profile) PROFILE=$(realpath "$2"); shift 2 ;;
        --fake-gpus) FAKE_GPUS=$2; shift 2 ;;
        --allow-diff) ALLOW_DIFF+=("$2"); shift 2 ;;
        --no-install) INSTALL=0; shift ;;
        --keep-running) KEEP_RUNNING=1; shift ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
if [[ $# -eq 0 ]]; then
    # No workflow given: the smoke workflow, in a scratch working directory.
    SMOKE=1
    WORKDIR=$(mktemp -d /tmp/dspo_slurm_smoke.XXXXXX)
    RESULTS=results
    SNAKEMAKE_ARGS=(--snakefile "$REPO/tests/slurm/smoke/Snakefile")
else
    SMOKE=0
    RESULTS=$1
    shift
    [[ ${1:-} == -- ]] && shift
    SNAKEMAKE_ARGS=("$@")
fi

[[ $(id -u) -eq 0 ]] || { echo "run as root (installs and starts system daemons)" >&2; exit 2; }
cd "$WORKDIR"
if [[ -e $RESULTS || -e $RESULTS.local-run ]]; then
    echo "$WORKDIR/$RESULTS or $RESULTS.local-run exists; move it away first" >&2
    exit 2
fi
# Jobs call `python -m pipeline ...`: the venv's python first, the repository importable.
export PATH=$(dirname "$PYTHON"):$PATH
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
LOGDIR=$WORKDIR/logs/slurm_test
mkdir -p "$LOGDIR"
declare -A SECONDS_TAKEN
phase_start() { PHASE_T0=$(date +%s%N); echo "== $1" >&2; }
phase_end() {
    local tenths=$((($(date +%s%N) - PHASE_T0) / 100000000))
    SECONDS_TAKEN[$1]=$((tenths / 10)).$((tenths % 10))
}

# --- install ---------------------------------------------------------------------------------
if [[ $INSTALL -eq 1 ]]; then
    phase_start install
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >"$LOGDIR/apt.log" 2>&1
    apt-get install -y -q --no-install-recommends \
        slurm-wlm slurmdbd munge mariadb-server >>"$LOGDIR/apt.log" 2>&1
    phase_end install
fi

# --- configure -------------------------------------------------------------------------------
stop_cluster() {
    scontrol shutdown >/dev/null 2>&1 || true   # stops slurmctld and slurmd
    for pidfile in /run/slurmdbd.pid /run/slurmctld.pid /run/slurmd.pid; do
        [[ -f $pidfile ]] && kill "$(cat "$pidfile")" 2>/dev/null || true
    done
    sleep 1
    service mariadb stop >/dev/null 2>&1 || true
    [[ -f /run/munge/munged.pid ]] && kill "$(cat /run/munge/munged.pid)" 2>/dev/null || true
}

phase_start start
stop_cluster
NODE_LINE=$(slurmd -C | head -1)            # NodeName=<host> CPUs=.. RealMemory=..
NODE=$(sed -E 's/^NodeName=([^ ]+).*/\1/' <<<"$NODE_LINE")
NODE_CPUS=$(sed -E 's/.* CPUs=([0-9]+).*/\1/' <<<"$NODE_LINE")
NODE_MEM=$(sed -E 's/.* RealMemory=([0-9]+).*/\1/' <<<"$NODE_LINE")
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge
cat >/etc/slurm/slurm.conf <<EOF
ClusterName=$CLUSTER
SlurmctldHost=$NODE
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageTRES=gres/gpu
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/linux
GresTypes=gpu
$NODE_LINE Gres=gpu:$FAKE_GPUS State=UNKNOWN
PartitionName=cpu Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$NODE MaxTime=INFINITE State=UP
EOF
# Fake GPUs: character devices equal to /dev/null stand in for /dev/nvidia*. slurmd needs
# device files to set CUDA_VISIBLE_DEVICES; with TaskPlugin=task/none nothing confines them.
mkdir -p /var/lib/slurm-fake-gpus
for i in $(seq 0 $((FAKE_GPUS - 1))); do
    device=/var/lib/slurm-fake-gpus/gpu$i
    [[ -c $device ]] || { rm -f "$device"; mknod "$device" c 1 3; }
done
cat >/etc/slurm/gres.conf <<EOF
AutoDetect=off
NodeName=$NODE Name=gpu File=/var/lib/slurm-fake-gpus/gpu[0-$((FAKE_GPUS - 1))]
EOF
cat >/etc/slurm/slurmdbd.conf <<EOF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurmtest
StorageLoc=slurm_acct_db
PidFile=/run/slurmdbd.pid
LogFile=/var/log/slurm/slurmdbd.log
EOF
chmod 600 /etc/slurm/slurmdbd.conf

if [[ ! -s /etc/munge/munge.key ]]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge/munge.key /run/munge
chmod 400 /etc/munge/munge.key
runuser -u munge -- /usr/sbin/munged
service mariadb start >/dev/null
mysql -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
          CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmtest';
          GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
slurmdbd
for _ in $(seq 60); do sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 1; done
sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null
slurmctld
slurmd
sleep 2
# A drain reason saved by an earlier, misconfigured start survives restarts; clear it.
scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
for _ in $(seq 60); do [[ $(sinfo -h -N -o %T 2>/dev/null | head -1) == idle ]] && break; sleep 1; done
sinfo -N -o '%N %P %T %c %m %G' >&2
[[ $(sinfo -h -N -o %T | head -1) == idle ]] || { echo "node not idle; see /var/log/slurm" >&2; exit 1; }
phase_end start

# --- the profile, capped to this node ----------------------------------------------------------
FITTED=$(mktemp -d /tmp/dspo_slurm_profile.XXXXXX)
trap 'rm -rf "$FITTED"' EXIT
"$PYTHON" - "$PROFILE/config.yaml" "$FITTED/config.yaml" "$NODE_MEM" "$FAKE_GPUS" "$NODE_CPUS" <<'EOF'
import sys
import yaml

source, target, node_mem, fake_gpus, node_cpus = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
profile = yaml.safe_load(open(source))
blocks = {"default-resources": profile.get("default-resources", {})}
blocks.update({f"set-resources.{rule}": r for rule, r in profile.get("set-resources", {}).items()})
for name, resources in blocks.items():
    for key, cap in (("mem_mb", node_mem), ("gpu", fake_gpus)):
        if key in resources and resources[key] > cap:
            print(f"profile: {name}.{key} {resources[key]} -> {cap}", file=sys.stderr)
            resources[key] = cap
    if resources.pop("gpu_model", None):
        print(f"profile: {name}.gpu_model dropped (fake gres has no type)", file=sys.stderr)
profile["max-threads"] = node_cpus
yaml.safe_dump(profile, open(target, "w"), sort_keys=False)
EOF

# --- local run, then Slurm run ---------------------------------------------------------------
# The local run asks for the same GPUs per rule as the fitted profile and leases them from the
# same fake device ids, so a job runs the same number of (DDP) processes in both runs: K
# processes reduce gradients in another order than one, which would change the weights' bytes.
mapfile -t LOCAL_GPU_ARGS < <("$PYTHON" - "$FITTED/config.yaml" <<'EOF'
import sys
import yaml

profile = yaml.safe_load(open(sys.argv[1]))
requests = [f"{rule}:gpu={r['gpu']}" for rule, r in profile.get("set-resources", {}).items()
            if "gpu" in r]
if requests:
    print("--set-resources", *requests, sep="\n")
EOF
)
SNAKEMAKE=("$PYTHON" -m snakemake)
phase_start local-run
CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((FAKE_GPUS - 1))) DSPO_GPU_LEASE_DIR=$LOGDIR/gpu_leases \
    "${SNAKEMAKE[@]}" --workflow-profile none --cores all --resources gpu="$FAKE_GPUS" \
    "${LOCAL_GPU_ARGS[@]}" "${SNAKEMAKE_ARGS[@]}" \
    >"$LOGDIR/local.log" 2>&1 || { tail -30 "$LOGDIR/local.log" >&2; exit 1; }
phase_end local-run
mv "$RESULTS" "$RESULTS.local-run"

phase_start slurm-run
"${SNAKEMAKE[@]}" --workflow-profile "$FITTED" --slurm-init-seconds-before-status-checks 5 \
    "${SNAKEMAKE_ARGS[@]}" >"$LOGDIR/slurm.log" 2>&1 || { tail -40 "$LOGDIR/slurm.log" >&2; exit 1; }
phase_end slurm-run

# --- checks ----------------------------------------------------------------------------------
STATUS=0
JOB_IDS=$(sed -nE 's/.*submitted with SLURM jobid ([0-9]+).*/\1/p' "$LOGDIR/slurm.log" | paste -sd,)
if [[ -z $JOB_IDS ]]; then
    echo "FAIL: no job was submitted to Slurm (see $LOGDIR/slurm.log)" >&2
    STATUS=1
else
    sacct -X -P -j "$JOB_IDS" -o JobID,JobName%36,Partition,State,ExitCode,Elapsed,AllocTRES \
        | tee "$LOGDIR/sacct.txt" >&2
    N_SUBMITTED=$(tr , '\n' <<<"$JOB_IDS" | wc -l)
    N_COMPLETED=$(sacct -X -n -P -j "$JOB_IDS" -o State | grep -c '^COMPLETED$' || true)
    echo "sacct: $N_COMPLETED of $N_SUBMITTED submitted jobs COMPLETED" >&2
    [[ $N_COMPLETED -eq $N_SUBMITTED ]] || STATUS=1
fi
"$PYTHON" - "$RESULTS.local-run" "$RESULTS" "${ALLOW_DIFF[@]}" <<'EOF' || STATUS=1
import fnmatch
import sys
from pathlib import Path

local, slurm, allowed = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
names = {p.relative_to(root).as_posix() for root in (local, slurm) for p in root.rglob("*")
         if p.is_file()}
differ = [n for n in sorted(names)
          if not any(fnmatch.fnmatch(n, g) for g in allowed)
          and not ((local / n).is_file() and (slurm / n).is_file()
                   and (local / n).read_bytes() == (slurm / n).read_bytes())]
print(f"compare: {len(names)} files, {len(differ)} differ between the local and the Slurm run",
      file=sys.stderr)
for name in differ:
    print(f"  differs or missing: {name}", file=sys.stderr)
sys.exit(1 if differ or not names else 0)
EOF

if [[ $SMOKE -eq 1 ]]; then
    # The GPU rule must have kept Slurm's device assignment and launched one process per GPU.
    cat logs/slurm_smoke/train.log >&2
    line=$(grep -m1 '^run-gpu:' logs/slurm_smoke/train.log || true)
    if ! [[ $line =~ devices\ ([0-9,]+)\ \[slurm\],\ ([0-9]+)\ process ]] \
        || (($(tr , '\n' <<<"${BASH_REMATCH[1]}" | wc -l) != BASH_REMATCH[2])); then
        echo "FAIL: train did not run one process per GPU Slurm assigned" >&2
        STATUS=1
    fi
fi
if [[ $KEEP_RUNNING -eq 0 ]]; then stop_cluster; fi
for phase in install start local-run slurm-run; do
    [[ -n ${SECONDS_TAKEN[$phase]:-} ]] && echo "time $phase: ${SECONDS_TAKEN[$phase]} s" >&2
done
echo "logs: $LOGDIR; results: $WORKDIR/$RESULTS (Slurm) and $WORKDIR/$RESULTS.local-run" >&2
[[ $STATUS -eq 0 ]] && echo "PASS" >&2 || echo "FAIL" >&2
exit $STATUS
