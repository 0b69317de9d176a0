;; expect: wasm-limit wall-time
;; limits: fuel=1000000000000000 wall_ms=300
;; With a practically unbounded work budget, the epoch deadline stops the loop.
(module
  (memory (export "memory") 1)
  (@custom "sandbox.manifest" "{\"name\":\"t\",\"purpose\":\"credit_assessment\",\"input\":[\"tax_monthly.credit_code\"]}")
  (func (export "run") (param i32) (result i32)
    (loop $forever (br $forever))
    (i32.const 0)))
