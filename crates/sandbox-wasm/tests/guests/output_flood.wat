;; expect: wasm-limit output-bytes
;; limits: max_output_batches=1000000
;; Re-emits the first input batch forever: the output byte cap stops it.
(module
  (import "sandbox" "input_next" (func $input_next (result i64)))
  (import "sandbox" "input_read" (func $input_read (param i32 i32) (result i32)))
  (import "sandbox" "output_emit" (func $output_emit (param i32 i32) (result i32)))
  (memory (export "memory") 16)
  (@custom "sandbox.manifest" "{\"name\":\"t\",\"purpose\":\"credit_assessment\",\"input\":[\"tax_monthly.credit_code\"]}")
  (func (export "run") (param i32) (result i32)
    (local $len i32)
    (local.set $len (i32.wrap_i64 (call $input_next)))
    (drop (call $input_read (i32.const 1024) (local.get $len)))
    (loop $again
      (drop (call $output_emit (i32.const 1024) (local.get $len)))
      (br $again))
    (i32.const 0)))
