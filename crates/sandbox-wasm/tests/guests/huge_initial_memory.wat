;; expect: wasm-limit memory
;; Declares 4 GiB up front: refused when the instance is created.
(module
  (memory (export "memory") 65536)
  (@custom "sandbox.manifest" "{\"name\":\"t\",\"purpose\":\"credit_assessment\",\"input\":[\"tax_monthly.credit_code\"]}")
  (func (export "run") (param i32) (result i32) (i32.const 0)))
