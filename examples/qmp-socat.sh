#!/bin/sh
# Talk QMP to a running blockd with nothing but socat: negotiate, then ask for the
# version. Usage: examples/qmp-socat.sh SOCKET   (e.g. after `blockd --socket /tmp/b.sock &`)
# Every reply is one JSON object per line; the first line is the greeting.
set -eu
sock="${1:?usage: $0 SOCKET}"
printf '%s\n' \
    '{"execute": "qmp_capabilities"}' \
    '{"execute": "query-version", "id": 1}' |
    socat -t 2 - "UNIX-CONNECT:$sock"
