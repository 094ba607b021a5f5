# need TOOL DEBIAN_PACKAGE...: the tool, installed with apt-get when it is
# missing and this runs as root; else a clear failure naming the package.
# Sourced by tests/platforms/run.sh and arm64_python.sh.
need() {
    local tool=$1
    shift
    command -v "$tool" >/dev/null && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "platforms: installing $* (apt-get)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null 2>&1 ||
            { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null; }
    fi
    command -v "$tool" >/dev/null || { echo "platforms: $tool not found: apt-get install $*" >&2; exit 1; }
}
