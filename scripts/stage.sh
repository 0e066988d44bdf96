# Stage timings for `just ci`. Source it, then `stage NAME CMD...` runs CMD
# and prints `stage NAME: 123 s`. When the shell exits, passing or failing, it
# prints every stage run so far, so a slow or failed run shows where the time
# went.

_stage_lines=()

stage() {
    local name=$1 start=$SECONDS rc=0
    shift
    echo "stage $name: starting"
    "$@" || rc=$?
    local line="stage $name: $((SECONDS - start)) s"
    ((rc == 0)) || line+=" (FAILED, exit $rc)"
    _stage_lines+=("$line")
    echo "$line"
    return "$rc"
}

_stage_summary() {
    echo "---- stages (total $SECONDS s)"
    printf '%s\n' "${_stage_lines[@]}"
}
trap _stage_summary EXIT
