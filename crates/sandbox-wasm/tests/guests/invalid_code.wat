;; expect: wasm-malformed
;; Parses, but does not validate: the body leaves an i64 where an i32 is declared.
(module
  (memory (export "memory") 1)
  (@custom "sandbox.manifest" "{\"name\":\"t\",\"purpose\":\"credit_assessment\",\"input\":[\"tax_monthly.credit_code\"]}")
  (func (export "run") (param i32) (result i32) (i64.const 1)))
