// bf16x3 (six products) 2x2-tile kernel over an L2-resident row block, one thread
#include <immintrin.h>
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/syscall.h>
typedef struct { uint8_t palette_id, start_row, rsv[14]; uint16_t colsb[16]; uint8_t rows[16]; } cfg_t;
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
#define M 192
#define N 768
#define K 768
int main(){
  if (syscall(SYS_arch_prctl, 0x1023, 18)) {perror("perm");return 1;}
  cfg_t c; memset(&c,0,sizeof c); c.palette_id=1;
  for(int i=0;i<8;i++){c.colsb[i]=64;c.rows[i]=16;}
  _tile_loadconfig(&c);
  // A parts: [part][rowtile (M/16)][ktile (K/32)] 16x32 bf16 tiles, 1 KiB each
  uint16_t *A = aligned_alloc(64, 3*(size_t)M*K*2);
  // B parts: [part][coltile (N/16)][ktile (K/32)] 16 rows(K pairs) x 32 bf16, 1 KiB each
  uint16_t *B = aligned_alloc(64, 3*(size_t)K*N*2);
  float *C = aligned_alloc(64, (size_t)M*N*4);
  for (size_t i=0;i<3*(size_t)M*K;i++) A[i]=0x3f80; for (size_t i=0;i<3*(size_t)K*N;i++) B[i]=0x3f80;
  size_t at = 1024/2, mt=M/16, kt=K/32, nt=N/16;
  #define AT(p,r,k) (A + (((p)*mt + (r))*kt + (k))*at)
  #define BT(p,n,k) (B + (((p)*nt + (n))*kt + (k))*at)
  for (int rep=0; rep<30; rep++){
    double t0=now();
    for (int it=0; it<5; it++)
    for (size_t n=0;n<nt;n+=2) for (size_t r=0;r<mt;r+=2){
      _tile_zero(0);_tile_zero(1);_tile_zero(2);_tile_zero(3);
      for (size_t k=0;k<kt;k++){
        _tile_loadd(4, AT(0,r,k),64); _tile_loadd(5, AT(0,r+1,k),64);
        _tile_loadd(6, BT(0,n,k),64); _tile_loadd(7, BT(0,n+1,k),64);
        _tile_dpbf16ps(0,4,6);_tile_dpbf16ps(1,4,7);_tile_dpbf16ps(2,5,6);_tile_dpbf16ps(3,5,7);
        _tile_loadd(6, BT(1,n,k),64); _tile_loadd(7, BT(1,n+1,k),64);
        _tile_dpbf16ps(0,4,6);_tile_dpbf16ps(1,4,7);_tile_dpbf16ps(2,5,6);_tile_dpbf16ps(3,5,7);
        _tile_loadd(6, BT(2,n,k),64); _tile_loadd(7, BT(2,n+1,k),64);
        _tile_dpbf16ps(0,4,6);_tile_dpbf16ps(1,4,7);_tile_dpbf16ps(2,5,6);_tile_dpbf16ps(3,5,7);
        _tile_loadd(4, AT(1,r,k),64); _tile_loadd(5, AT(1,r+1,k),64);
        _tile_loadd(6, BT(0,n,k),64); _tile_loadd(7, BT(0,n+1,k),64);
        _tile_dpbf16ps(0,4,6);_tile_dpbf16ps(1,4,7);_tile_dpbf16ps(2,5,6);_tile_dpbf16ps(3,5,7);
        _tile_loadd(6, BT(1,n,k),64); _tile_loadd(7, BT(1,n+1,k),64);
        _tile_dpbf16ps(0,4,6);_tile_dpbf16ps(1,4,7);_tile_dpbf16ps(2,5,6);_tile_dpbf16ps(3,5,7);
        _tile_loadd(4, AT(2,r,k),64); _tile_loadd(5, AT(2,r+1,k),64);
        _tile_loadd(6, BT(0,n,k),64); _tile_loadd(7, BT(0,n+1,k),64);
        _tile_dpbf16ps(0,4,6);_tile_dpbf16ps(1,4,7);_tile_dpbf16ps(2,5,6);_tile_dpbf16ps(3,5,7);
      }
      float *cp = C + (r*16)*N + n*16;
      _tile_stored(0, cp, N*4); _tile_stored(1, cp+16, N*4); _tile_stored(2, cp+16*N, N*4); _tile_stored(3, cp+16*N+16, N*4);
    }
    double dt=now()-t0;
    printf("%.0f ", 5*2.0*M*N*K/dt/1e9);
  }
  printf("GFLOP/s (f32-equivalent, one thread)\n");
  _tile_release();
  return (int)C[5]&0;
}
