;; expect: wasm-limit output-rows
;; limits: max_output_rows=5
;; The echo guest under a cap of five output rows.
(module
  (import "sandbox" "input_next" (func $input_next (result i64)))
  (import "sandbox" "input_read" (func $input_read (param i32 i32) (result i32)))
  (import "sandbox" "output_emit" (func $output_emit (param i32 i32) (result i32)))
  (import "sandbox" "log" (func $log (param i32 i32)))
  (memory (export "memory") 16)
  (data (i32.const 0) "echo started")
  (@custom "sandbox.manifest" "{\"name\":\"t\",\"purpose\":\"credit_assessment\",\"input\":[\"tax_monthly.credit_code\"]}")
  (func (export "run") (param $params_len i32) (result i32)
    (local $len i32)
    (call $log (i32.const 0) (i32.const 12))
    (block $done
      (loop $next
        (local.set $len (i32.wrap_i64 (call $input_next)))
        (br_if $done (i32.lt_s (local.get $len) (i32.const 0)))
        (drop (call $input_read (i32.const 1024) (local.get $len)))
        (drop (call $output_emit (i32.const 1024) (local.get $len)))
        (br $next)))
    (i32.const 0)))
