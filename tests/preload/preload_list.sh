# Sourced by the preload tests. preload_list LIB: what LD_PRELOAD must say for
# LIB: in a sanitizer build the sanitizer's runtime comes first (ASan refuses
# to start otherwise; ASan's before UBSan's, both are there with
# -fsanitize=address,undefined), then LIB.
preload_list() {
  local lib=$1 list="" name dep
  if command -v ldd >/dev/null 2>&1; then
    for name in asan tsan lsan ubsan; do
      dep=$(ldd "$lib" | awk -v n="lib$name.so" 'index($1, n) == 1 && $3 ~ /^\// { print $3 }')
      [ -n "$dep" ] && list="$list$dep "
    done
  fi
  echo "$list$lib"
}
