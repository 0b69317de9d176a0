;; expect: wasm-abi
(module
  (import "sandbox" "output_emit" (func $output_emit (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "these bytes are not an Arrow IPC stream")
  (@custom "sandbox.manifest" "{\"name\":\"t\",\"purpose\":\"credit_assessment\",\"input\":[\"tax_monthly.credit_code\"]}")
  (func (export "run") (param i32) (result i32)
    (call $output_emit (i32.const 0) (i32.const 39))))
