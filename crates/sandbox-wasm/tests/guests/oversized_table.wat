;; expect: wasm-limit table
(module
  (memory (export "memory") 1)
  (table 5000000 funcref)
  (@custom "sandbox.manifest" "{\"name\":\"t\",\"purpose\":\"credit_assessment\",\"input\":[\"tax_monthly.credit_code\"]}")
  (func (export "run") (param i32) (result i32) (i32.const 0)))
