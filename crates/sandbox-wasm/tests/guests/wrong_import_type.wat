;; expect: wasm-forbidden-import
(module
  (import "sandbox" "log" (func (param i64)))
  (memory (export "memory") 1)
  (@custom "sandbox.manifest" "{\"name\":\"t\",\"purpose\":\"credit_assessment\",\"input\":[\"tax_monthly.credit_code\"]}")
  (func (export "run") (param i32) (result i32) (i32.const 0)))
