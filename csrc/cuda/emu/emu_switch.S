// emu_switch(void** save_sp, void* to_sp): saves the callee-saved registers of the running fiber
// (or scheduler) on its stack, stores its stack pointer in *save_sp, and resumes the context whose
// stack pointer is to_sp (System V x86-64; a new fiber's stack is laid out by run_block).
  .text
  .globl emu_switch
  .hidden emu_switch
  .type emu_switch,@function
emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size emu_switch,.-emu_switch
  .section .note.GNU-stack,"",@progbits
