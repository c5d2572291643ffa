# Sourced by the GPU session scripts (`. "$repo/tests/gpu/steps.sh"`), after they set $out (the output folder).
# step NAME SECONDS COMMAND…: run with a time limit, log to $out/NAME.log, report exit and time in $out/steps.txt
step() {
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    echo "$name: exit $? in $((SECONDS - start)) s" | tee -a "$out/steps.txt"
}
