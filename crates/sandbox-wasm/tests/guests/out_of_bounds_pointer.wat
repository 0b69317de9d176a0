;; expect: wasm-abi
(module
  (import "sandbox" "output_emit" (func $output_emit (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (@custom "sandbox.manifest" "{\"name\":\"t\",\"purpose\":\"credit_assessment\",\"input\":[\"tax_monthly.credit_code\"]}")
  (func (export "run") (param i32) (result i32)
    (call $output_emit (i32.const 65000) (i32.const 100000))))
