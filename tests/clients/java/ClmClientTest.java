// Calls a running `clm up` through Java stubs generated from proto/ with
// Debian's packaged toolchain (protoc, grpc_java_plugin, the grpc-java,
// protobuf-java, guava, perfmark and netty jars under /usr/share/java;
// javac, no Maven): a customer is created, a touchpoint recorded, its score
// read, its segment membership checked, and a bad request comes back
// INVALID_ARGUMENT with its BadRequest decoded from grpc-status-details-bin
// (google.rpc.Status and BadRequest generated from the vendored
// proto/google/rpc). run.sh generates, compiles and runs it; it exits 1
// on the first failed check.

import clm.customer.v1.CustomerOuterClass.Customer;
import clm.customer.v1.CustomerOuterClass.Touchpoint;
import clm.customer.v1.CustomerOuterClass.TouchpointType;
import clm.customer.v1.CustomerServiceGrpc;
import clm.customer.v1.CustomerServiceOuterClass.CreateCustomerRequest;
import clm.customer.v1.CustomerServiceOuterClass.RecordTouchpointsRequest;
import clm.scoring.v1.Scoring.CustomerScores;
import clm.scoring.v1.Scoring.ScoreValue;
import clm.scoring.v1.Scoring.ScoringModel;
import clm.scoring.v1.Scoring.ScoringRule;
import clm.scoring.v1.ScoringServiceGrpc;
import clm.scoring.v1.ScoringServiceOuterClass.CreateScoringModelRequest;
import clm.scoring.v1.ScoringServiceOuterClass.GetScoreRequest;
import clm.segmentation.v1.SegmentationServiceGrpc;
import clm.segmentation.v1.SegmentationServiceOuterClass.CreateSegmentRequest;
import clm.segmentation.v1.SegmentationServiceOuterClass.IsMemberRequest;
import clm.segmentation.v1.SegmentationServiceOuterClass.Segment;
import com.google.protobuf.Any;
import com.google.protobuf.Timestamp;
import com.google.rpc.BadRequest;
import google.rpc.StatusOuterClass;
import io.grpc.ManagedChannel;
import io.grpc.ManagedChannelBuilder;
import io.grpc.Metadata;
import io.grpc.Status;
import io.grpc.StatusRuntimeException;
import java.util.ArrayList;
import java.util.List;
import java.util.UUID;
import java.util.concurrent.TimeUnit;
import java.util.function.BooleanSupplier;

public final class ClmClientTest {
  private static final Metadata.Key<byte[]> DETAILS =
      Metadata.Key.of("grpc-status-details-bin", Metadata.BINARY_BYTE_MARSHALLER);

  private static ManagedChannel channel(String env) {
    String addr = System.getenv(env);
    check(addr != null && !addr.isEmpty(), env + " is set (run.sh sets the address clm up printed)");
    return ManagedChannelBuilder.forTarget(addr).usePlaintext().build();
  }

  private static void check(boolean ok, String what) {
    if (!ok) {
      System.err.println("FAILED: " + what);
      System.exit(1);
    }
  }

  /** Scoring and segmentation follow the customer stream: retry a moment. */
  private static void eventually(String what, BooleanSupplier check) throws InterruptedException {
    long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(30);
    while (true) {
      try {
        if (check.getAsBoolean()) {
          return;
        }
      } catch (StatusRuntimeException e) {
        if (System.nanoTime() > deadline) {
          throw e;
        }
      }
      check(System.nanoTime() < deadline, what + " in time");
      Thread.sleep(100);
    }
  }

  static void aScoredTouchpointPutsTheCustomerInASegment(
      ManagedChannel c, ManagedChannel s, ManagedChannel g) throws InterruptedException {
    var customers = CustomerServiceGrpc.newBlockingStub(c).withWaitForReady();
    var scoring = ScoringServiceGrpc.newBlockingStub(s).withWaitForReady();
    var segments = SegmentationServiceGrpc.newBlockingStub(g).withWaitForReady();
    String tag = UUID.randomUUID().toString().substring(0, 8);

    ScoringModel model = scoring.withDeadlineAfter(10, TimeUnit.SECONDS).createScoringModel(
        CreateScoringModelRequest.newBuilder()
            .setScoringModelId("java-" + tag)
            .setScoringModel(ScoringModel.newBuilder()
                .setDisplayName("Java leads")
                .addRules(ScoringRule.newBuilder()
                    .setId("exports").setScore("engagement").setPoints(10)
                    .setTouchpoint("feature_use where feature = \"export\"")))
            .setRequestId("java-model-" + tag)
            .build());
    Segment segment = segments.withDeadlineAfter(10, TimeUnit.SECONDS).createSegment(
        CreateSegmentRequest.newBuilder()
            .setSegment(Segment.newBuilder()
                .setDisplayName("Java engaged " + tag).setOwner("growth")
                .setRuleText("score(\"java-" + tag + "\").engagement >= 10"))
            .setRequestId("java-segment-" + tag)
            .build());
    Customer customer = customers.withDeadlineAfter(10, TimeUnit.SECONDS).createCustomer(
        CreateCustomerRequest.newBuilder()
            .setCustomer(Customer.newBuilder()
                .setEmail("java-" + tag + "@example.com").setDisplayName("Java"))
            .setRequestId("java-customer-" + tag)
            .build());
    customers.withDeadlineAfter(10, TimeUnit.SECONDS).recordTouchpoints(
        RecordTouchpointsRequest.newBuilder()
            .addTouchpoints(Touchpoint.newBuilder()
                .setCustomer(customer.getName()).setEventId("java-export-" + tag)
                .setType(TouchpointType.TOUCHPOINT_TYPE_FEATURE_USE).setFeature("export")
                .setOccurredTime(Timestamp.newBuilder()
                    .setSeconds(System.currentTimeMillis() / 1000)))
            .build());

    eventually("engagement score 10", () -> {
      CustomerScores scores = scoring.withDeadlineAfter(10, TimeUnit.SECONDS).getScore(
          GetScoreRequest.newBuilder()
              .setCustomer(customer.getName()).setScoringModel(model.getName()).build());
      for (ScoreValue v : scores.getScoresList()) {
        if (v.getScore().equals("engagement") && v.getValue() == 10) {
          return true;
        }
      }
      return false;
    });
    eventually("segment membership", () -> segments.withDeadlineAfter(10, TimeUnit.SECONDS)
        .isMember(IsMemberRequest.newBuilder()
            .setSegment(segment.getName()).setCustomer(customer.getName()).build())
        .getMember());
    System.out.println("ok: a scored touchpoint puts " + customer.getName() + " in " + segment.getName());
  }

  static void aBadRequestNamesTheFieldInABadRequestDetail(ManagedChannel c) throws Exception {
    var customers = CustomerServiceGrpc.newBlockingStub(c).withWaitForReady();
    try {
      customers.withDeadlineAfter(10, TimeUnit.SECONDS).createCustomer(
          CreateCustomerRequest.newBuilder()
              .setCustomer(Customer.newBuilder().setEmail("not-an-email")).build());
      check(false, "CreateCustomer with a bad e-mail is refused");
    } catch (StatusRuntimeException e) {
      check(e.getStatus().getCode() == Status.Code.INVALID_ARGUMENT,
          "INVALID_ARGUMENT, got " + e.getStatus());
      byte[] raw = e.getTrailers() == null ? null : e.getTrailers().get(DETAILS);
      check(raw != null, "grpc-status-details-bin trailer present");
      List<String> fields = new ArrayList<>();
      for (Any detail : StatusOuterClass.Status.parseFrom(raw).getDetailsList()) {
        if (detail.is(BadRequest.class)) {
          for (var v : detail.unpack(BadRequest.class).getFieldViolationsList()) {
            fields.add(v.getField());
          }
        }
      }
      check(!fields.isEmpty() && fields.get(0).equals("customer.email"),
          "a BadRequest naming customer.email, got " + fields);
      System.out.println("ok: a bad request names " + fields.get(0) + " in a BadRequest detail");
    }
  }

  public static void main(String[] args) throws Exception {
    ManagedChannel c = channel("CLM_CUSTOMER_ADDR");
    ManagedChannel s = channel("CLM_SCORING_ADDR");
    ManagedChannel g = channel("CLM_SEGMENTATION_ADDR");
    try {
      aScoredTouchpointPutsTheCustomerInASegment(c, s, g);
      aBadRequestNamesTheFieldInABadRequestDetail(c);
    } finally {
      for (ManagedChannel ch : List.of(c, s, g)) {
        ch.shutdownNow().awaitTermination(5, TimeUnit.SECONDS);
      }
    }
  }
}
