;; expect: wasm-limit memory
(module
  (memory (export "memory") 1)
  (@custom "sandbox.manifest" "{\"name\":\"t\",\"purpose\":\"credit_assessment\",\"input\":[\"tax_monthly.credit_code\"]}")
  (func (export "run") (param i32) (result i32)
    (loop $grow
      (br_if $grow (i32.ne (memory.grow (i32.const 64)) (i32.const -1))))
    (i32.const 0)))
