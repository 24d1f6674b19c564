#!/usr/bin/env bash
# Container entrypoint: make sure a repository cache exists, then mount it.
#
# Two modes:
#   no arguments    sidecar: the mount daemon runs in the foreground as this
#                   process (exec), so SIGTERM reaches it directly and it
#                   flushes, unmounts and exits 0.
#   COMMAND [ARG]   wrapper: mount, run COMMAND with the mount in place,
#                   unmount, exit with COMMAND's status; SIGTERM/SIGINT are
#                   passed to COMMAND first, and the mount is undone after it.
#
# Environment (only JIAOZI_REPO is required):
#   JIAOZI_REPO          the repository directory (the local cache of a remote one)
#   JIAOZI_MOUNT         mount point (default /mnt/jiaozi; created if missing)
#   JIAOZI_COMMIT        mount only this commit or tag, read-only (mount --commit)
#   JIAOZI_BRANCH        mount only this branch, as the mount point (mount --branch)
#   JIAOZI_READ_ONLY     1: mount everything read-only
#   JIAOZI_ALLOW_OTHER   1: let other users (other containers' uids) use the mount
#   JIAOZI_REMOTE        s3://BUCKET/PREFIX: clone it when JIAOZI_REPO holds no
#                        repository yet; fetch new commits when it does
#   JIAOZI_ENDPOINT_URL  S3 endpoint for non-AWS stores (SeaweedFS, MinIO, ...)
#   JIAOZI_CACHE_SIZE    bound on cached chunk bytes for a clone (e.g. 20G)
#   JIAOZI_FETCH         0: do not fetch at start (default 1 when a remote is set)
#   JIAOZI_INIT          1: create the repository if there is none (on the remote too)
#   JIAOZI_MOUNT_ARGS    more options for 'jiaozifuse mount', split on spaces
#   JIAOZI_CLI           the jiaozifuse command (default: jiaozifuse on PATH)
# S3 credentials come the usual boto3 way (AWS_ACCESS_KEY_ID, ... or a role).
set -euo pipefail

log() {
    echo "jiaozifuse-entrypoint: $*" >&2
}

die() {
    log "$*"
    exit 1
}

REPO="${JIAOZI_REPO:-}"
MNT="${JIAOZI_MOUNT:-/mnt/jiaozi}"
CLI="${JIAOZI_CLI:-jiaozifuse}"
REMOTE="${JIAOZI_REMOTE:-}"
[ -n "$REPO" ] || die "set JIAOZI_REPO to the repository directory"
if [ -n "${JIAOZI_COMMIT:-}" ] && [ -n "${JIAOZI_BRANCH:-}" ]; then
    die "set JIAOZI_COMMIT or JIAOZI_BRANCH, not both"
fi
# Library logs (mount ready, signals, unmount) belong in the container log.
export JIAOZIFUSE_LOG_LEVEL="${JIAOZIFUSE_LOG_LEVEL:-INFO}"

remote_opts=()
if [ -n "${JIAOZI_ENDPOINT_URL:-}" ]; then
    remote_opts+=(--endpoint-url "$JIAOZI_ENDPOINT_URL")
fi

ensure_repo() {
    if [ -f "$REPO/config.json" ]; then
        if [ -n "$REMOTE" ] && [ "${JIAOZI_FETCH:-1}" != 0 ]; then
            # A cache kept from an earlier run (hostPath, a volume): bring
            # the commits made since. Offline is not fatal: what is cached
            # can still be mounted.
            "$CLI" --repo "$REPO" fetch >&2 || log "fetch from $REMOTE failed; mounting the cache as it is"
        fi
        return 0
    fi
    if [ -n "$REMOTE" ]; then
        local cache_opts=()
        if [ -n "${JIAOZI_CACHE_SIZE:-}" ]; then
            cache_opts+=(--cache-size "$JIAOZI_CACHE_SIZE")
        fi
        log "cloning $REMOTE into $REPO"
        if "$CLI" clone "${remote_opts[@]}" "${cache_opts[@]}" "$REMOTE" "$REPO" >&2; then
            return 0
        fi
        # Without config.json the directory is no repository yet, only a
        # half-made cache: clear it so that the next attempt can start over.
        [ -f "$REPO/config.json" ] || rm -rf "$REPO/store"
        [ "${JIAOZI_INIT:-0}" = 1 ] || die "cannot clone $REMOTE (set JIAOZI_INIT=1 to create it)"
        log "creating a repository at $REMOTE"
        if "$CLI" init "${remote_opts[@]}" "${cache_opts[@]}" --remote "$REMOTE" "$REPO" >&2; then
            return 0
        fi
        # Another node created it first: clone theirs.
        [ -f "$REPO/config.json" ] || rm -rf "$REPO/store"
        "$CLI" clone "${remote_opts[@]}" "${cache_opts[@]}" "$REMOTE" "$REPO" >&2
        return
    fi
    [ "${JIAOZI_INIT:-0}" = 1 ] || die "no repository at $REPO: set JIAOZI_REMOTE to clone one, or JIAOZI_INIT=1"
    "$CLI" init "$REPO" >&2
}

mount_args() {
    MOUNT_ARGS=("$REPO" "$MNT")
    if [ -n "${JIAOZI_COMMIT:-}" ]; then
        MOUNT_ARGS+=(--commit "$JIAOZI_COMMIT")
    elif [ -n "${JIAOZI_BRANCH:-}" ]; then
        MOUNT_ARGS+=(--branch "$JIAOZI_BRANCH")
    fi
    if [ "${JIAOZI_READ_ONLY:-0}" = 1 ]; then
        MOUNT_ARGS+=(--read-only)
    fi
    if [ "${JIAOZI_ALLOW_OTHER:-0}" = 1 ]; then
        MOUNT_ARGS+=(--allow-other)
    fi
    if [ -n "${JIAOZI_MOUNT_ARGS:-}" ]; then
        local extra
        read -r -a extra <<<"$JIAOZI_MOUNT_ARGS"
        MOUNT_ARGS+=("${extra[@]}")
    fi
}

ensure_repo
mkdir -p "$MNT"
mount_args

if [ "$#" -eq 0 ]; then
    log "mounting $REPO at $MNT (foreground; SIGTERM unmounts)"
    exec "$CLI" mount --foreground "${MOUNT_ARGS[@]}"
fi

# Wrapper mode. Our own messages go to stderr: stdout is the command's.
"$CLI" mount "${MOUNT_ARGS[@]}" >&2
log "mounted $REPO at $MNT; running: $*"
child=""
# shellcheck disable=SC2329  # called by the trap below
forward() {
    log "signal received: stopping the command, then unmounting"
    if [ -n "$child" ]; then
        kill -TERM "$child" 2>/dev/null || true
    fi
}
trap forward TERM INT
"$@" &
child=$!
status=0
# `wait` returns early when a trapped signal arrives: wait again until the
# command has really exited, so the unmount never pulls data from under it.
while true; do
    wait "$child" && status=0 || status=$?
    if ! kill -0 "$child" 2>/dev/null; then
        break
    fi
done
trap - TERM INT
if ! "$CLI" umount "$MNT" >&2; then
    log "unmount of $MNT failed (busy?): detaching lazily"
    "$CLI" umount --lazy "$MNT" >&2 || true
fi
exit "$status"
