# Sourced by the recipes beside it (not run on its own): reads MODEL DATA OUTPUT_DIR from the
# first three arguments or, when the first argument is a flag or absent, from the environment,
# and leaves the remaining arguments in RECIPE_EXTRA (passed to sdpo-train last, so they win).
recipe_arguments() {
    local usage="$1"
    shift
    if [[ $# -ge 3 && "$1" != -* ]]; then
        MODEL="$1" DATA="$2" OUTPUT_DIR="$3"
        shift 3
    fi
    if [[ -z "${MODEL:-}" || -z "${DATA:-}" || -z "${OUTPUT_DIR:-}" ]]; then
        echo "usage: $usage MODEL_DIR DATA OUTPUT_DIR [sdpo-train flags...] (or MODEL=, DATA=, OUTPUT_DIR= in the environment)" >&2
        exit 2
    fi
    RECIPE_EXTRA=("$@")
    # The interpreter that has sdpo installed; PYTHON=... picks another.
    PYTHON="${PYTHON:-python}"
}
