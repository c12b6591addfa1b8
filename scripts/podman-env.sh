# Sourced by the scripts that run podman: the container engine's settings for this kind of
# machine, in a containers.conf of the project's own (the system's is left alone).
# - No default ulimits: podman's default raises RLIMIT_NOFILE, which some sandboxes forbid
#   (runc then fails with "error setting rlimit type 7").
# - On cgroup v1 hosts, runc with the cgroupfs driver (crun refuses v1 hybrid set-ups).
qw_conf_dir=${XDG_RUNTIME_DIR:-/tmp}/querywarden-containers
mkdir -p "$qw_conf_dir"
{
  echo '[containers]'
  echo 'default_ulimits = []'
  if [[ "$(stat -fc %T /sys/fs/cgroup 2>/dev/null)" != cgroup2fs ]]; then
    echo '[engine]'
    echo 'runtime = "runc"'
    echo 'cgroup_manager = "cgroupfs"'
  fi
} >"$qw_conf_dir/containers.conf"
export CONTAINERS_CONF="$qw_conf_dir/containers.conf"
