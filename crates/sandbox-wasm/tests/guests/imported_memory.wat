;; expect: wasm-forbidden-import
(module
  (import "sandbox" "memory" (memory 1))
  (export "memory" (memory 0))
  (@custom "sandbox.manifest" "{\"name\":\"t\",\"purpose\":\"credit_assessment\",\"input\":[\"tax_monthly.credit_code\"]}")
  (func (export "run") (param i32) (result i32) (i32.const 0)))
