;; expect: wasm-limit table
(module
  (memory (export "memory") 1)
  (table $t 1 funcref)
  (@custom "sandbox.manifest" "{\"name\":\"t\",\"purpose\":\"credit_assessment\",\"input\":[\"tax_monthly.credit_code\"]}")
  (func (export "run") (param i32) (result i32)
    (loop $grow
      (br_if $grow (i32.ne (table.grow $t (ref.null func) (i32.const 1000)) (i32.const -1))))
    (i32.const 0)))
