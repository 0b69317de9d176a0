;; expect: wasm-limit log
(module
  (import "sandbox" "log" (func $log (param i32 i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "spam")
  (@custom "sandbox.manifest" "{\"name\":\"t\",\"purpose\":\"credit_assessment\",\"input\":[\"tax_monthly.credit_code\"]}")
  (func (export "run") (param i32) (result i32)
    (loop $spam (call $log (i32.const 0) (i32.const 4)) (br $spam))
    (i32.const 0)))
