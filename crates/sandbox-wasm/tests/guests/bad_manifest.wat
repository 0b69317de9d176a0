;; expect: wasm-manifest
;; The declared input must be dataset.column names.
(module
  (memory (export "memory") 1)
  (@custom "sandbox.manifest" "{\"name\":\"t\",\"purpose\":\"credit_assessment\",\"input\":[\"tax_monthly\"]}")
  (func (export "run") (param i32) (result i32) (i32.const 0)))
