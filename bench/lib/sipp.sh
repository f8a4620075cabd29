# SIPp load steps shared by the SIP benchmarks. Source it from the
# repository's root, and set $dir (a scratch directory) and $step_secs.
sipp_scenarios=$PWD

# One SIPp run against host:port in its own directory; prints
# "ok failed p50 p99" (response times in ms, "-" without samples).
sipp_step() { # name host:port rate count sipp-args...
  local name=$1 target=$2 rate=$3 count=$4; shift 4
  local d="$dir/$name"; mkdir -p "$d"
  (cd "$d" && timeout $((step_secs + 60)) sipp "$target" -i 127.0.0.1 -t u1 -nostdin \
      -r "$rate" -rp 1000 -m "$count" -l $((rate * 4)) -timeout $((step_secs + 40))s -buff_size 4194304 \
      -trace_stat -stf stat.csv -trace_rtt -rtt_freq 1 -trace_err "$@" > sipp.out 2>&1) || true
  local ok failed
  ok=$(awk -F';' 'NR==1{for(i=1;i<=NF;i++) if($i=="SuccessfulCall(C)") c=i} END{print $c+0}' "$d/stat.csv" 2>/dev/null || echo 0)
  failed=$(awk -F';' 'NR==1{for(i=1;i<=NF;i++) if($i=="FailedCall(C)") c=i} END{print $c+0}' "$d/stat.csv" 2>/dev/null || echo 0)
  local p
  p=$(cat "$d"/*_rtt.csv 2>/dev/null | awk -F';' '$2 ~ /^[0-9.]+$/ {print $2}' | sort -n |
    awk '{a[NR]=$1} END{ if (NR==0) {print "- -"} else {i50=int(NR*0.5); if(i50<1)i50=1; i99=int(NR*0.99); if(i99<1)i99=1; printf "%.1f %.1f\n", a[i50], a[i99]}}')
  echo "$ok $failed $p"
}

# A SIPp callee answering every call on 127.0.0.1:$uas_port, registered
# as callee@bench.test (digest password bench-password) at host:port;
# sets $uas to its pid.
sipp_callee() { # host:port uas_port label
  local target=$1 uas_port=$2 label=$3
  (cd "$dir" && exec sipp -sf "$sipp_scenarios/bench/sipp/uas.xml" -i 127.0.0.1 -p "$uas_port" -t u1 -nostdin \
      -trace_err > /dev/null 2>&1) &
  uas=$!
  sleep 0.5
  mkdir -p "$dir/reg-callee-$label"
  (cd "$dir/reg-callee-$label" && sipp "$target" -sf "$sipp_scenarios/signaling/tests/sipp/register.xml" -i 127.0.0.1 -t u1 -nostdin -m 1 \
      -s callee%40bench.test -au callee@bench.test -ap bench-password -auth_uri parley.test -key contact_port "$uas_port" \
      -timeout 10s -timeout_error > out 2>&1) || { echo "callee registration failed"; cat "$dir/reg-callee-$label/out"; exit 1; }
}
