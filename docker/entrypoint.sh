#!/bin/sh
# The image's entrypoint: check that the chat-record folder is writable by the
# image's user (uid 10001) before starting, and say how to fix it in one line.
# A bind mount of a folder Docker created (-v "$PWD/Log:/data/Log") is owned by
# root, so the proxy could not write its records there.
set -eu
case "${LOG_CHAT:-true}" in
    [Ff]alse|0|[Nn]o|[Oo]ff) ;;
    *)
        dir="${LOG_DIR:-Log}"
        case "$dir" in /*) ;; *) dir="$(pwd)/$dir" ;; esac
        if [ -e "$dir" ] && ! [ -w "$dir" ]; then
            echo "twisted-forward: $dir is not writable by uid $(id -u): run 'chown -R $(id -u) <host folder>' or mount a named volume (-v twisted-forward-log:/data/Log)" >&2
            exit 78
        fi
        ;;
esac
exec "$@"
