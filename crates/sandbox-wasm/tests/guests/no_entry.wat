;; expect: wasm-missing-export
(module
  (memory (export "memory") 1)
  (@custom "sandbox.manifest" "{\"name\":\"t\",\"purpose\":\"credit_assessment\",\"input\":[\"tax_monthly.credit_code\"]}")
  (func (export "main") (result i32) (i32.const 0)))
